from sdcli.generation.metadata import a1111_parameters, parse_a1111

RECORD = {
    "prompt": "a red circle, high detail",
    "negative_prompt": "blurry",
    "steps": 25,
    "sampler": "DPM++ 2M",
    "schedule_type": "Karras",
    "guidance": 7.5,
    "seed": 1234,
    "width": 64,
    "height": 48,
    "model_name": "shapes",
    "guidance_rescale": 0.7,
    "sdcli_version": "0.1.0",
}


def test_a1111_format_round_trips():
    text = a1111_parameters(RECORD)
    lines = text.split("\n")
    assert lines[0] == "a red circle, high detail"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, ")
    parsed = parse_a1111(text)
    assert parsed["prompt"] == RECORD["prompt"]
    assert parsed["negative_prompt"] == "blurry"
    assert parsed["Size"] == "64x48"
    assert parsed["CFG Rescale phi"] == "0.7"
    assert parsed["Model"] == "shapes"


def test_no_negative_line_when_empty():
    text = a1111_parameters({**RECORD, "negative_prompt": "", "guidance_rescale": 0})
    assert "Negative prompt" not in text
    assert "CFG Rescale" not in text
    assert len(text.split("\n")) == 2


def test_quoted_values_with_commas_stay_whole():
    text = ('a cat\nSteps: 20, Sampler: Euler, ControlNet 0: "Module: canny, Model: cn, Weight: 0.8", '
            'TI hashes: "bad: abc, good: def", Seed: 3')
    parsed = parse_a1111(text)
    assert parsed["ControlNet 0"] == '"Module: canny, Model: cn, Weight: 0.8"'
    assert parsed["TI hashes"] == '"bad: abc, good: def"'
    assert parsed["Seed"] == "3" and parsed["Sampler"] == "Euler"
