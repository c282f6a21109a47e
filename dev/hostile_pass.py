"""A hostile pass, run by hand: 150 bad inputs of the kinds issue 28 found (code on --resume, NaN from prompt
weights, options silently ignored, non-finite numbers, the "unexpected X" catch-all, files, memory), each driven
through the real CLI in a subprocess on tiny pipelines and the bundled model.

    python dev/hostile_pass.py [REPO] [NAME-FILTER]     # about 12 minutes on a 2-core CPU

Each case prints `ok` or `FAIL` with what it found; the last line counts the failures. A refusal passes when it
exits non-zero with exactly one `error:` line on stderr, no traceback and no "unexpected"; an accepted option
passes when it changed the image. Work files go to $SDCLI_HOSTILE_DIR (default /tmp/sdcli-hostile).
"""
import json, os, pickle, shutil, subprocess, sys, time
from pathlib import Path

REPO = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve()
ONLY = sys.argv[2] if len(sys.argv) > 2 else None
W = Path(os.environ.get("SDCLI_HOSTILE_DIR", "/tmp/sdcli-hostile"))
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
ENV.pop("SDCLI_DEBUG", None)
M = W / "models"

def setup_models():
    if (M / "done").exists():
        return
    shutil.rmtree(M, ignore_errors=True); M.mkdir(parents=True)
    code = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
from sdcli.testing import save_tiny_pipeline, save_random_lora
for f in ("sd1", "sdxl", "sd3", "flux", "flux-schnell"):
    save_tiny_pipeline({str(M)!r} + "/" + f, f)
save_random_lora({str(M)!r} + "/sd1", {str(M)!r} + "/lora-sd1")
"""
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True)
    (M / "done").write_text("")

def sd(*a, cwd=None, timeout=300):
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "sdcli", *map(str, a)], capture_output=True, text=True, env=ENV,
                       cwd=cwd, timeout=timeout)
    r.seconds = time.time() - t
    return r

CASES = []
def case(name):
    def deco(fn):
        CASES.append((name, fn)); return fn
    return deco

def refused(r, *, code=None, mention=None):
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("warning:") and not l.startswith("note:")]
    errs = [l for l in lines if l.startswith("error:")]
    problems = []
    if r.returncode == 0: problems.append("exit 0")
    if code is not None and r.returncode != code: problems.append(f"exit {r.returncode} != {code}")
    if len(errs) != 1: problems.append(f"{len(errs)} error lines")
    if "Traceback" in r.stderr: problems.append("traceback")
    if r.returncode == 2 and not errs and "Invalid value" in r.stderr: return [], "click usage error"
    if any("unexpected" in e for e in errs): problems.append("catch-all unexpected")
    if "NaN" in r.stderr and "model produced" in r.stderr: problems.append("late NaN")
    if mention and not any(m.lower() in r.stderr.lower() for m in ([mention] if isinstance(mention, str) else mention)):
        problems.append(f"does not mention {mention}")
    return problems, (errs[0] if errs else r.stderr.strip()[-300:])

def ok(r):
    problems = []
    if r.returncode != 0: problems.append(f"exit {r.returncode}")
    if "Traceback" in r.stderr: problems.append("traceback")
    return problems, (r.stderr.strip().splitlines() or [""])[-1]

def fresh(name):
    d = W / "cases" / name; shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True); return d

# ---- 2. prompt weights on the bundled model: never NaN, never an error
for i, p in enumerate(["a small (blue:1.3) star at the top on a white background",
                       "a (large:1.5) green square on the left on a gray background",
                       "a pink ((triangle)) in the bottom right corner on a black background",
                       "a [[[yellow]]] circle in the center on a black background",
                       "a large (red circle:1.2) on a (white:0.6) background",
                       "(a small purple star in the top right corner:1.8) on a black background",
                       "a large orange (square:0.3) at the bottom on a gray background",
                       "a (white:1.25) circle in the center on a black background"]):
    @case(f"weights-{i}")
    def _(p=p, i=i):
        d = fresh(f"weights-{i}")
        r = sd("generate", p, "--seed", "3", "--steps", "8", "-o", d / "x.png")
        pr, msg = ok(r)
        if not pr:
            import numpy as np; from PIL import Image
            a = np.asarray(Image.open(d / "x.png").convert("RGB")).astype(float)
            if not np.isfinite(a).all(): pr.append("nonfinite")
        return pr, msg

# ---- 4. non-finite numbers in prompts
for i, p in enumerate(["a (red:1" + "0" * 400 + ") circle", "a (red:-1" + "0" * 320 + ") circle", "a (red:" + "9" * 40 + ") circle", "a [red:1" + "0" * 400 + "] circle",
                       "a [red:blue:nan] circle", "a [red:blue:-inf] circle", "a [red:blue:1e400] circle", "a [red::inf] circle"]):
    @case(f"prompt-num-{i}")
    def _(p=p, i=i):
        d = fresh(f"prompt-num-{i}")
        return refused(sd("generate", p, "--steps", "2", "-o", d / "x.png"))

# ---- 5. deep nesting
for i, p in enumerate(["(" * 4000 + "red" + ")" * 4000, "[" * 5000 + "red" + "]" * 5000, "[" * 3000 + "a:b:0.5" + "]" * 3000,
                       "[" * 20000 + "(" * 20000]):
    @case(f"nesting-{i}")
    def _(p=p, i=i):
        d = fresh(f"nesting-{i}")
        return refused(sd("generate", p, "--steps", "2", "-o", d / "x.png"))

# ---- generate numeric options
for i, args in enumerate([["--hires-scale", "nan"], ["--hires-scale", "1e308"], ["--hires-scale", "-2"],
                          ["--guidance", "inf"], ["--guidance", "nan,7"], ["--guidance-rescale", "nan"],
                          ["--strength", "nan", "--init-image", "IMG"], ["--outpaint", "٣,0,0,0", "--init-image", "IMG"],
                          ["--outpaint", "1e9,0,0,0", "--init-image", "IMG"], ["--outpaint", "³,0,0,0", "--init-image", "IMG"],
                          ["--lora", "LORA:nan"], ["--lora", "LORA:1e309"], ["--lora", "LORA:-inf"],
                          ["--hires-strength", "inf", "--hires-scale", "2"], ["--control-start", "nan"],
                          ["--seed", "²"], ["-W", "٦٤"], ["--steps", "0"]]):
    @case(f"gen-num-{i}")
    def _(args=args, i=i):
        d = fresh(f"gen-num-{i}")
        from PIL import Image
        Image.new("RGB", (64, 64), (10, 200, 30)).save(d / "img.png")
        a = [str(d / "img.png") if x == "IMG" else x.replace("LORA", str(M / "lora-sd1")) for x in args]
        model = ["--model", M / "sd1"] if any("lora" in x for x in args) else []
        steps = [] if "--steps" in a else ["--steps", "2"]
        return refused(sd("generate", "a red circle", *model, *steps, *a, "-o", d / "x.png"))

# ---- NaN inside a LoRA file / embedding file
@case("lora-nan-tensor")
def _():
    d = fresh("lora-nan-tensor")
    from safetensors.torch import load_file, save_file
    import torch
    src = M / "lora-sd1"
    f = next(src.glob("*.safetensors"))
    t = load_file(f); k = next(iter(t)); t[k] = t[k].clone(); t[k].view(-1)[0] = float("inf")
    shutil.copytree(src, d / "lora"); save_file(t, d / "lora" / f.name)
    return refused(sd("generate", "a red circle", "--model", M / "sd1", "--lora", d / "lora", "--steps", "2", "-o", d / "x.png"))

@case("embedding-nan")
def _():
    d = fresh("embedding-nan")
    import torch; from safetensors.torch import save_file
    v = torch.randn(1, 32); v[0, 3] = float("nan")
    save_file({"emb_params": v}, d / "tok.safetensors")
    return refused(sd("generate", "a tok", "--model", M / "sd1", "--embedding", d / "tok.safetensors", "--steps", "2", "-o", d / "x.png"))

@case("embedding-collision")
def _():
    d = fresh("embedding-collision")
    import torch; from safetensors.torch import save_file
    save_file({"emb_params": torch.randn(2, 32)}, d / "ab.safetensors")
    save_file({"emb_params": torch.randn(1, 32)}, d / "ab_1.safetensors")
    return refused(sd("generate", "ab ab_1", "--model", M / "sd1", "--embedding", d / "ab.safetensors", "--embedding", d / "ab_1.safetensors", "--steps", "2", "-o", d / "x.png"))

@case("embedding-wrong-size")
def _():
    d = fresh("embedding-wrong-size")
    import torch; from safetensors.torch import save_file
    save_file({"emb_params": torch.randn(1, 7)}, d / "tok.safetensors")
    return refused(sd("generate", "a tok", "--model", M / "sd1", "--embedding", d / "tok.safetensors", "--steps", "2", "-o", d / "x.png"))

@case("sdxl-embedding-mismatch")
def _():
    d = fresh("sdxl-embedding-mismatch")
    import torch; from safetensors.torch import save_file
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(3, 32)}, d / "tok.safetensors")
    return refused(sd("generate", "a tok", "--model", M / "sdxl", "--embedding", d / "tok.safetensors", "--steps", "2", "-o", d / "x.png"))

@case("sdxl-embedding-on-flux")
def _():
    d = fresh("sdxl-embedding-on-flux")
    import torch; from safetensors.torch import save_file
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)}, d / "tok.safetensors")
    return refused(sd("generate", "a tok", "--model", M / "flux", "--embedding", d / "tok.safetensors", "--steps", "2", "-o", d / "x.png"))

@case("sdxl-embedding-on-sd3")
def _():
    d = fresh("sdxl-embedding-on-sd3")
    import torch; from safetensors.torch import save_file
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)}, d / "tok.safetensors")
    return refused(sd("generate", "a tok", "--model", M / "sd3", "--embedding", d / "tok.safetensors", "--steps", "2", "-o", d / "x.png"))

# ---- 3. options that do nothing on flow families: refused (or take effect)
for fam, args in [("sd3", ["--clip-skip", "2"]), ("flux", ["--clip-skip", "3"]), ("flux", ["--sigmas", "exponential"]),
                  ("sd3", ["--sigmas", "beta"]), ("sd3", ["-s", "pndm"]), ("flux", ["-s", "dpm++2m-karras"]),
                  ("flux", ["-n", "blurry"]), ("flux-schnell", ["-n", "blurry"]), ("flux-schnell", ["--guidance", "5"]),
                  ("flux", ["--guidance-rescale", "0.7"])]:
    @case(f"flow-{fam}-{'_'.join(args)}")
    def _(fam=fam, args=args):
        d = fresh(f"flow-{fam}-{args[0]}")
        r = sd("generate", "a red circle", "--model", M / fam, *args, "--steps", "6", "-o", d / "x.png", "--seed", "1")
        if r.returncode == 0:
            # it took effect? compare with the same without the option
            r2 = sd("generate", "a red circle", "--model", M / fam, "--steps", "6", "-o", d / "y.png", "--seed", "1")
            import numpy as np; from PIL import Image
            a = np.asarray(Image.open(d / "x.png")); b = np.asarray(Image.open(d / "y.png"))
            if (a == b).all():
                return ["accepted but image identical"], "ignored"
            return [], "took effect"
        return refused(r)

for fam, p in [("flux", "a (red:1.5) circle"), ("sd3", "a red circle BREAK blue background"), ("flux", "a [red] circle")]:
    @case(f"flow-syntax-{fam}-{p[:12]}")
    def _(fam=fam, p=p):
        d = fresh(f"flow-syntax-{fam}")
        r = sd("generate", p, "--model", M / fam, "--steps", "2", "-o", d / "x.png", "--seed", "1")
        if r.returncode == 0:
            return ["accepted (literal?)"], r.stderr.strip()[-200:]
        return refused(r)

# ---- malformed --from-metadata
def record_png(d, params: dict | None, parameters: str | None):
    from PIL import Image, PngImagePlugin
    r = sd("generate", "a red circle", "--steps", "2", "--seed", "1", "-o", d / "src.png")
    assert r.returncode == 0, r.stderr
    img = Image.open(d / "src.png")
    info = PngImagePlugin.PngInfo()
    for k, v in img.text.items():
        if k == "sdcli" and params is not None:
            rec = json.loads(v); rec.update(params)
            for key in [k2 for k2, v2 in params.items() if v2 == "__DEL__"]:
                rec.pop(key)
            v = json.dumps(rec)
        if k == "parameters" and parameters is not None:
            v = parameters
        info.add_text(k, v)
    img.save(d / "rec.png", pnginfo=info)
    return d / "rec.png"

for i, params in enumerate([{"steps": "1e2"}, {"seed": "x"}, {"width": -64}, {"guidance": "Infinity"}, {"prompt": [None]},
                            {"loras": {"a": 1}}, {"steps": 10**12}, {"hires_scale": 1e308}, {"embeddings": [[1, 2, 3]]},
                            {"height": 64.5}, {"seed": None}, {"prompt": 5}, {"loras": "abc"}, {"guidance_rescale": float("nan")},
                            {"clip_skip": "two"}, {"sampler": 7}, {"sigmas": "karras2"}, {"negative_prompt": ["x"]}]):
    @case(f"record-{i}")
    def _(params=params, i=i):
        d = fresh(f"record-{i}")
        src = record_png(d, params, None)
        return refused(sd("generate", "--from-metadata", src, "-o", d / "x.png"))

@case("record-missing-steps")
def _():
    d = fresh("record-missing-steps")
    src = record_png(d, {"steps": "__DEL__", "width": "__DEL__", "height": "__DEL__"}, None)
    from PIL import Image
    r = sd("generate", "--from-metadata", src, "-o", d / "x.png")
    if r.returncode == 0:
        a = Image.open(d / "x.png"); b = Image.open(d / "src.png")
        import numpy as np
        return ([] if (np.asarray(a) == np.asarray(b)).all() else ["replayed to a different image"]), "ok"
    return refused(r)

# ---- finetune numbers
def data(d):
    from PIL import Image
    (d / "data").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (200, 30 * i, 30)).save(d / "data" / f"{i}.png")
        (d / "data" / f"{i}.txt").write_text("a red circle")
    return d / "data"

for i, args in enumerate([["--learning-rate", "nan"], ["--learning-rate", "1e309"], ["--lora-alpha", "inf"], ["--noise-offset", "nan"],
                          ["--resolution", "0"], ["--resolution", "65536"], ["--rank", "0"], ["--rank", "1000000"],
                          ["--ema", "--ema-decay", "nan"], ["--snr-gamma", "-inf"], ["--max-grad-norm", "nan"], ["--uncond-prob", "1.5"],
                          ["--weight-decay", "inf"]]):
    @case(f"ft-num-{i}")
    def _(args=args, i=i):
        d = fresh(f"ft-num-{i}")
        return refused(sd("finetune", "--data", data(d), "--model", M / "sd1", "--out", d / "out", "--max-steps", "1", *args))

@case("ft-caption-latin1")
def _():
    d = fresh("ft-caption-latin1"); dd = data(d)
    (dd / "0.txt").write_bytes("a red café circle".encode("latin-1"))
    r = sd("finetune", "--data", dd, "--model", M / "sd1", "--out", d / "out", "--max-steps", "1")
    if r.returncode == 0:
        s = (d / "out").rglob("*.json")
        txt = " ".join(p.read_text(errors="replace") for p in s)
        return (["U+FFFD in outputs"] if "\ufffd" in txt else []), "decoded"
    return refused(r, mention="0.txt")

# ---- inspect-schedule
for i, args in enumerate([["--num-train-timesteps", "900000000"], ["--num-train-timesteps", "0"], ["--shift", "nan"],
                          ["--shift", "-1"], ["--training", "--preset", "sd3", "--mode-scale", "3", "--timestep-sampling", "mode"],
                          ["--training", "--preset", "sd3", "--logit-std", "-1", "--timestep-sampling", "logit-normal"],
                          ["--logit-std", "2", "--preset", "sd3"], ["--snr-gamma", "5"], ["--beta-start", "nan"],
                          ["--resolution", "inf", "--preset", "flux"]]):
    @case(f"is-{i}")
    def _(args=args, i=i):
        return refused(sd("inspect-schedule", *args, timeout=120))

@case("karras-zero-snr")
def _():
    d = fresh("karras-zero-snr")
    r = sd("generate", "a red circle on a black background", "-s", "dpm++2m", "--sigmas", "karras", "--steps", "10", "-o", d / "x.png")
    return ok(r)

# ---- files
@case("next-counter-symlink")
def _():
    d = fresh("next-counter-symlink")
    (d / "precious.txt").write_text("keep me")
    (d / "out").mkdir(); os.symlink(d / "precious.txt", d / "out" / ".sdcli-next")
    r = sd("generate", "a red circle", "--steps", "2", "--out", d / "out")
    pr = [] if (d / "precious.txt").read_text() == "keep me" else ["symlink target changed"]
    return pr, r.stderr.strip()[-200:]

@case("overwrite-foreign")
def _():
    d = fresh("overwrite-foreign")
    (d / "out").mkdir(); (d / "out" / "thesis.docx").write_text("mine")
    (d / "out" / "adapter_config.json").write_text("{}")
    r = sd("finetune", "--data", data(d), "--model", M / "sd1", "--out", d / "out", "--max-steps", "1", "--overwrite")
    pr = [] if (d / "out" / "thesis.docx").exists() else ["foreign file deleted"]
    return pr, (r.stderr.strip().splitlines() or [""])[-1]

@case("trajectory-name-first")
def _():
    d = fresh("trajectory-name-first")
    (d / "x-trajectory.png").mkdir()
    for p in d.iterdir(): pass
    r = sd("generate", "a red circle", "--steps", "2", "-o", d / "x.png", "--save-trajectory")
    pr = []
    if (d / "x.png").exists() and r.returncode != 0: pr.append("image written before the trajectory failed")
    return pr, (r.stderr.strip().splitlines() or [""])[-1]

@case("long-name")
def _():
    d = fresh("long-name")
    return refused(sd("generate", "a red circle", "--steps", "2", "-o", d / ("n" * 252 + ".png")))

@case("long-out-folder")
def _():
    d = fresh("long-out")
    return refused(sd("finetune", "--data", data(d), "--model", M / "sd1", "--out", d / ("o" * 300), "--max-steps", "1"))

@case("readonly-out")
def _():
    d = fresh("readonly-out"); (d / "ro").mkdir(); os.chmod(d / "ro", 0o555)
    if os.geteuid() == 0:
        # root ignores modes: use a read-only bind? fall back to /proc
        out = Path("/proc/sdcli-out")
    else:
        out = d / "ro" / "out"
    r = sd("finetune", "--data", data(d), "--model", M / "sd1", "--out", out, "--max-steps", "1")
    return refused(r)

# ---- resume pickle
@case("resume-pickle")
def _():
    d = fresh("resume-pickle")
    r = sd("finetune", "--data", data(d), "--model", M / "sd1", "--out", d / "out", "--max-steps", "2", "--checkpoint-every", "1")
    if r.returncode: return ["could not train"], r.stderr[-300:]
    ckpts = sorted(p for p in (d / "out").rglob("*") if p.is_dir() and "checkpoint" in p.name)
    ck = ckpts[-1]
    marker = d / "PWNED"
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    targets = [p for p in ck.rglob("*") if p.suffix in (".pkl", ".bin", ".pt", ".pth")] or [ck / "random_states_0.pkl"]
    for t in targets:
        t.write_bytes(pickle.dumps(Evil()))
    r = sd("finetune", "--data", d / "data", "--model", M / "sd1", "--out", d / "out", "--max-steps", "3", "--resume", ck)
    if marker.exists(): return ["CODE RAN"], r.stderr[-200:]
    if r.returncode == 0:  # the new format holds no pickle: a planted one is never read
        return [], f"resumed; planted {[t.name for t in targets]} never read, marker absent"
    return refused(r)

@case("resume-other-model")
def _():
    d = fresh("resume-other")
    r = sd("finetune", "--data", data(d), "--model", M / "sd1", "--out", d / "out", "--max-steps", "2", "--checkpoint-every", "1")
    ck = sorted(p for p in (d / "out").rglob("*") if p.is_dir() and "checkpoint" in p.name)[-1]
    r = sd("finetune", "--data", d / "data", "--model", M / "sdxl", "--out", d / "out2", "--max-steps", "3", "--resume", ck)
    pr, msg = refused(r)
    if "damaged" in msg: pr.append("blames damage")
    return pr, msg

# ---- round 2 variants
for i, args in enumerate([["-n", "(blurry:inf)"], ["-n", "[[[[" * 30 + "x" + "]]]]" * 30], ["--", "(red:100.5) circle"],
                          ["--", "a [red:blue:-0.5] circle"], ["--hires-scale", "8.5"], ["--seed", "٣"],
                          ["--outpaint", "𝟠,0,0,0", "--init-image", "IMG"], ["--batch-size", "-1"],
                          ["-W", "1000000", "-H", "64"], ["--guidance", "1e5"], ["--lora", "LORA:1e400"],
                          ["--embedding", "EMBPT"], ["--lora", "LORABIN"], ["-o", "FILEPARENT/x.png"]]):
    @case(f"r2-gen-{i}")
    def _(args=args, i=i):
        d = fresh(f"r2-gen-{i}")
        from PIL import Image
        import torch
        Image.new("RGB", (64, 64), (10, 200, 30)).save(d / "img.png")
        torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, d / "tok.pt")
        (d / "lorabin").mkdir(); torch.save({"x": torch.zeros(1)}, d / "lorabin" / "pytorch_lora_weights.bin")
        (d / "afile").write_text("x")
        subs = {"IMG": str(d / "img.png"), "EMBPT": str(d / "tok.pt"), "LORABIN": str(d / "lorabin"),
                "FILEPARENT/x.png": str(d / "afile" / "x.png")}
        a = [subs.get(x, x.replace("LORA", str(M / "lora-sd1"))) for x in args]
        model = ["--model", M / "sd1"] if any(x in ("--lora", "--embedding") for x in args) else []
        prompt = [] if "--" in a else ["a red circle"]
        out = [] if "-o" in a else ["-o", d / "x.png"]
        return refused(sd("generate", *prompt, *model, *out, "--steps", "2", *a))

@case("r2-parameters-only-record")
def _():
    d = fresh("r2-parameters-only")
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle\nSteps: nan, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64")
    Image.new("RGB", (64, 64)).save(d / "p.png", pnginfo=info)
    return refused(sd("generate", "--from-metadata", d / "p.png", "-o", d / "x.png"))

@case("r2-parameters-only-record-size")
def _():
    d = fresh("r2-parameters-only2")
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 4, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x۶۴")
    Image.new("RGB", (64, 64)).save(d / "p.png", pnginfo=info)
    return refused(sd("generate", "--from-metadata", d / "p.png", "-o", d / "x.png"))

@case("r2-lora-changed-on-replay")
def _():
    d = fresh("r2-lora-changed")
    shutil.copytree(M / "lora-sd1", d / "lora")
    r = sd("generate", "a red circle", "--model", M / "sd1", "--lora", d / "lora", "--steps", "2", "--seed", "1", "-o", d / "a.png")
    if r.returncode: return ["could not generate"], r.stderr[-200:]
    from safetensors.torch import load_file, save_file
    f = next((d / "lora").glob("*.safetensors")); t = load_file(f); k = next(iter(t)); t[k] = t[k] * 2; save_file(t, f)
    return refused(sd("generate", "--from-metadata", d / "a.png", "-o", d / "b.png"), mention="lora")

for i, args in enumerate([["--validation-prompt", "(red:nan)"], ["--class-prompt", "[[" * 200 + "x", "--class-data", "CLS"],
                          ["--lr", "-0.0"], ["--resolution", "8.5"], ["--batch-size", "0"], ["--max-steps", "-1"],
                          ["--threads", "0"], ["--epochs", "1e9"], ["--out", "FILE"], ["--rank", "33"]]):
    @case(f"r2-ft-{i}")
    def _(args=args, i=i):
        d = fresh(f"r2-ft-{i}")
        (d / "FILE").write_text("x")
        a = [str(d / "FILE") if x == "FILE" else str(d / "cls") if x == "CLS" else x for x in args]
        out = [] if "--out" in a else ["--out", d / "out"]
        return refused(sd("finetune", "--data", data(d), "--model", M / "sd1", *out, "--max-steps", "1", *a))

for i, args in enumerate([["--at", "1e9"], ["--every", "0"], ["--steps", "-4"], ["--threads", "nan"], ["--preset", "sd3", "--shift", "1e308"],
                          ["--training", "--snr-gamma", "nan"], ["--debiased-snr-floor", "0.01"], ["--mode-scale", "0.5", "--preset", "sd3"],
                          ["--num-train-timesteps", "1000001"], ["--beta-end", "2"]]):
    @case(f"r2-is-{i}")
    def _(args=args, i=i):
        return refused(sd("inspect-schedule", *args, timeout=120))

@case("r2-resume-fake-safetensors")
def _():
    d = fresh("r2-resume-fake")
    r = sd("finetune", "--data", data(d), "--model", M / "sd1", "--out", d / "out", "--max-steps", "2", "--checkpoint-every", "1")
    ck = sorted(p for p in (d / "out").rglob("*") if p.is_dir() and "checkpoint" in p.name)[-1]
    marker = d / "PWNED"
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    for t in ck.glob("*.safetensors"):
        t.write_bytes(pickle.dumps(Evil()))
    (ck / "extra.pkl").write_bytes(pickle.dumps(Evil()))
    r = sd("finetune", "--data", d / "data", "--model", M / "sd1", "--out", d / "out", "--max-steps", "3", "--resume", ck)
    pr, msg = refused(r)
    if marker.exists(): pr.append("CODE RAN")
    return pr, msg

@case("r2-lock-symlink")
def _():
    d = fresh("r2-lock-symlink")
    (d / "precious.txt").write_text("keep me")
    (d / "out").mkdir(); os.symlink(d / "precious.txt", d / "out" / ".sdcli-lock")
    r = sd("generate", "a red circle", "--steps", "2", "--out", d / "out")
    pr = [] if (d / "precious.txt").read_text() == "keep me" else ["symlink target changed"]
    return pr, r.stderr.strip()[-200:]

@case("r2-overwrite-nested-foreign")
def _():
    d = fresh("r2-overwrite-nested")
    r = sd("finetune", "--data", data(d), "--model", M / "sd1", "--out", d / "out", "--max-steps", "1")
    (d / "out" / "notes.md").write_text("mine")
    (d / "out" / "logs").mkdir(exist_ok=True); (d / "out" / "logs" / "mine.txt").write_text("mine")
    r = sd("finetune", "--data", d / "data", "--model", M / "sd1", "--out", d / "out", "--max-steps", "1", "--overwrite")
    pr = []
    if not (d / "out" / "notes.md").exists(): pr.append("notes.md deleted")
    if not (d / "out" / "logs" / "mine.txt").exists(): pr.append("logs/mine.txt deleted")
    if r.returncode: pr.append(f"exit {r.returncode}")
    return pr, (r.stderr.strip().splitlines() or [""])[-1]

if __name__ == "__main__":
    setup_models()
    results = []
    for name, fn in CASES:
        if ONLY and ONLY not in name: continue
        t = time.time()
        try:
            problems, msg = fn()
        except Exception as e:
            problems, msg = [f"harness: {type(e).__name__}: {e}"], ""
        results.append((name, problems, msg))
        print(("FAIL " if problems else "ok   ") + f"{name:40s} {time.time()-t:5.1f}s {problems} | {msg[:200]}", flush=True)
    print(f"{sum(1 for r in results if r[1])} of {len(results)} cases found a problem")
