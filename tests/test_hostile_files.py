"""Files from strangers: every damaged or hostile .safetensors file is one UserError line, at bounded memory.

A seeded corpus is built from three small valid files (a LoRA and an embedding for the tiny SD 1.x model, and
the tiny model itself): every truncation of the header, a few hundred seeded mutations of its fields (types,
offsets, shapes, dtypes, metadata, names), junk after the header, and NaN in the data. Each case goes through
the three readers as sample.py uses them (--lora, --embedding, --model) and must end in a UserError or in a
model that loads; no tensor larger than the file is ever allocated.
"""
import copy
import json
import math
import random
import resource
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import dreambooth_min
import sample
from dreambooth_min.errors import NonFinite, UserError
from dreambooth_min.formats import safetensors_io
from dreambooth_min.formats.embedding_file import load_embedding, save_embedding
from dreambooth_min.formats.lora_apply import apply_lora
from dreambooth_min.formats.lora_file import load_lora, save_lora
from dreambooth_min.formats.lora_names import kohya_name
from dreambooth_min.formats.safetensors_io import SafetensorsFile
from dreambooth_min.run.pivotal import use_embedding
from dreambooth_min.run.state import MANIFEST, sha256
from dreambooth_min.run.training import train
from test_training import config

MUTATIONS = 150  # seeded header mutations of the LoRA and of the embedding
MODEL_MUTATIONS = 60  # and of the model
MODEL_CUTS = 200  # the model's header is 92 KB: a seeded sample of its cuts (every one takes minutes)


def _lora_tensors(sd):
    """One UNet and one text-encoder module: a short header keeps every cut of it cheap."""
    g, tensors = torch.Generator().manual_seed(0), {}
    for part, model, target in (("unet", sd.unet, "attn2.to_k"), ("te", sd.text_encoder, "self_attn.v_proj")):
        name, m = next((n, m) for n, m in model.named_modules() if n.endswith(target))
        k = kohya_name(name, part)
        tensors[k + ".lora_down.weight"] = 0.1 * torch.randn(2, m.in_features, generator=g)
        tensors[k + ".lora_up.weight"] = 0.1 * torch.randn(m.out_features, 2, generator=g)
        tensors[k + ".alpha"] = torch.tensor(1.0)
    return tensors


@pytest.fixture(scope="module")
def corpus(tiny_sd1, tmp_path_factory):
    """The valid files, the model they fit, and the folder for the cases."""
    root = tmp_path_factory.mktemp("hostile")
    sd = dreambooth_min.load(tiny_sd1["single"])
    save_lora(root / "lora.safetensors", _lora_tensors(sd))
    save_embedding(root / "embedding.safetensors", {"clip_l": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))},
                   "<s0><s1>")
    return dict(sd=sd, root=root, lora=root / "lora.safetensors", embedding=root / "embedding.safetensors",
                model=tiny_sd1["single"])


def _read_lora(sd, path):
    tensors, metadata = load_lora(path)
    apply_lora(sd.unet, sd.text_encoder, tensors, scale=1.0, metadata=metadata, text_encoder_2=sd.text_encoder_2)


def _read_embedding(sd, path):
    load_embedding(path)  # refuses most cases before the model is copied
    fresh = copy.copy(sd)  # use_embedding adds rows: each case gets its own encoder (the tokenizer keeps the
    fresh.text_encoder = copy.deepcopy(sd.text_encoder)  # tokens, which is what one shared by two encoders does)
    use_embedding(fresh, path)


READERS = {"--lora": _read_lora, "--embedding": _read_embedding, "--model": lambda sd, path: dreambooth_min.load(path)}


def _split(data, sparse=False):
    """(header, body): the body's bytes, or with `sparse` its length (the cases are then written with zeros,
    which keeps the model's cases cheap: its data is 19 MB)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), len(data) - 8 - n if sparse else data[8 + n:]


def _file(header, body, pad=b""):
    """The file's bytes, or (its first bytes, its size) when `body` is a length of zeros."""
    raw = (header if isinstance(header, bytes) else json.dumps(header).encode()) + pad
    head = len(raw).to_bytes(8, "little") + raw
    return (head, len(head) + body) if isinstance(body, int) else head + body


def _write(path, data):
    with open(path, "wb") as f:
        if isinstance(data, tuple):
            data, size = data
            f.truncate(size)  # a sparse file: zeros, written in no time
        f.write(data)


# ---------------------------------------------------------------------------------------------------
# The corpus


def cuts(data, sample=None, seed=0, sparse=False):
    """The file cut inside its header (every length, or `sample` of them), and its header JSON cut with the
    length field telling the truth."""
    n = int.from_bytes(data[:8], "little")
    body = len(data) - 8 - n if sparse else data[8 + n:]
    lengths = range(8 + n)
    if sample is not None:
        lengths = sorted(set(range(64)) | set(random.Random(seed).sample(lengths, sample)))
    for length in lengths:
        yield f"cut at {length}", data[:length]
    for length in lengths if sample is None else lengths[::4]:
        if 0 < length <= n:
            yield f"header cut to {length}", _file(data[8:8 + length], body)


def _bad_value(rng):
    return rng.choice([None, True, -1, 1.5, "x", "8", [], [1, 2, 3], {}, {"a": 1}, 2**70, float("nan")])


def _mutate_entry(rng, header, name, original):
    """One field of entry `name` changed (from its `original` values)."""
    e, field = header[name], rng.choice(["dtype", "shape", "data_offsets", "entry", "drop"])
    (begin, end), shape = original["data_offsets"], original["shape"]
    if field == "entry":
        header[name] = _bad_value(rng)
    elif field == "drop":
        e.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
    elif field == "dtype":
        e["dtype"] = rng.choice(["F16", "F32", "F64", "BF16", "I8", "U8", "BOOL", "I64", "F8_E4M3", "f32", "",
                                 _bad_value(rng)])
    elif field == "shape":
        e["shape"] = rng.choice([[d + rng.choice([-1, 1]) for d in shape], shape + [1], shape[1:], [-1] + shape,
                                 [100000, 100000, 1000], "[2, 2]", [1.0, 2], [math.prod(shape)], _bad_value(rng)])
    else:
        e["data_offsets"] = rng.choice([[end, begin], [begin + 1, end + 1], [begin, end - 1], [begin - 1, end],
                                        [0, end - begin], [begin, 2**62], [begin, end, end], [begin],
                                        [str(begin), end], [float(begin), end], _bad_value(rng)])


def mutations(data, count, seed, sparse=False):
    """`count` seeded mutations of the header's fields (each case changes one to three things)."""
    header, body = _split(data, sparse)
    text = json.dumps(header)
    rng = random.Random(seed)
    names = [k for k in header if k != "__metadata__"]
    for i in range(count):
        h = json.loads(text)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            kind = rng.random()
            if kind < 0.75:
                name = rng.choice(names)
                if isinstance(h.get(name), dict):
                    _mutate_entry(rng, h, name, header[name])
            elif kind < 0.85:
                h["__metadata__"] = rng.choice([_bad_value(rng), {"k": _bad_value(rng)}, {"tokens": 7},
                                                dict(h.get("__metadata__") or {}, extra="fine")])
            elif kind < 0.9:
                name = rng.choice(list(h))
                h[name + "x"] = h.pop(name)  # a name nobody knows (the readers' own checks)
            else:
                h = rng.choice([[h], "header", 7, None])
                break
        raw = json.dumps(h).encode()
        yield f"mutation {i}", _file(raw, body)
        if rng.random() < 0.1:  # and the length field lies
            lie = max(0, len(raw) + rng.choice([-9, -1, 1, 7, 2**40])).to_bytes(8, "little")
            case = _file(raw, body)
            yield f"mutation {i}, length off", (lie + case[0][8:], case[1]) if sparse else lie + case[8:]


def junk(data, seed, sparse=False):
    header, body = _split(data, sparse)
    rng = random.Random(seed)
    noise = bytes(rng.randrange(256) for _ in range(64))
    raw = json.dumps(header).encode()
    yield "junk appended", _file(raw, body + len(noise)) if sparse else data + noise
    yield "junk between header and data", _file(raw, body + len(noise)) if sparse else _file(raw, noise + body)
    yield "junk inside the header length", _file(raw, body, pad=noise)
    yield "NUL padding", _file(raw, body, pad=b"\0" * 8)
    yield "second header", _file(raw, body, pad=raw)
    yield "not UTF-8", _file(raw[:-1] + b'"\xff\xfe"}', body)
    yield "deep nesting", _file(b"[" * 100000 + b"]" * 100000, body)
    yield "a 5000-digit number", _file(b'{"a": ' + b"9" * 5000 + b"}", body)
    yield "duplicate name", _file(raw[:-1] + b"," + raw[1:], body)


def issue_cases(lora):
    """The ten files of issue 33, built from the valid LoRA."""
    header, body = _split(lora.read_bytes())
    name = next(k for k in header if k.endswith("lora_down.weight"))

    def edit(change):
        h = copy.deepcopy(header)
        change(h)
        return _file(h, body)

    nan = bytearray(lora.read_bytes())
    start = 8 + int.from_bytes(nan[:8], "little") + header[name]["data_offsets"][0]
    nan[start:start + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    return {
        "missing data_offsets": edit(lambda h: h[name].pop("data_offsets")),
        "entry not an object": edit(lambda h: h.__setitem__(name, [1, 2])),
        "header a JSON list": _file([header], body),
        "shape a string": edit(lambda h: h[name].__setitem__("shape", "2, 32")),
        "40 TB promise": edit(lambda h: h[name].__setitem__("shape", [100000, 100000, 1000])),
        "20 GB promise, offsets agreeing": edit(lambda h: h[name].update(shape=[5 * 2**30], data_offsets=[0, 20 * 2**30])),
        "NaN LoRA": bytes(nan),
        "bytes not matching the shape": edit(lambda h: h[name].__setitem__("shape", [3, 32])),
        "offsets backwards": edit(lambda h: h[name].__setitem__("data_offsets", h[name]["data_offsets"][::-1])),
        "dtype not a string": edit(lambda h: h[name].__setitem__("dtype", 32)),
    }


# ---------------------------------------------------------------------------------------------------
# The fuzz run


@pytest.fixture
def no_big_allocations(monkeypatch):
    """Every tensor read from a file fits in the file: a header's promise is never allocated."""
    read = SafetensorsFile.read

    def guarded(self, name, out=None):
        e = self.entries[name]
        assert math.prod(e["shape"]) * safetensors_io.DTYPES[e["dtype"]].itemsize <= self.path.stat().st_size
        return read(self, name, out)
    monkeypatch.setattr(SafetensorsFile, "read", guarded)


def _run(corpus, cases, readers=READERS):
    """{outcome: count} over all cases through all readers; any other exception fails the test."""
    outcomes, root = {}, corpus["root"]
    for i, (label, data) in enumerate(cases):
        path = root / f"case_{i}.safetensors"
        _write(path, data)
        for flag, read in readers.items():
            try:
                read(corpus["sd"], path)
                outcome = "loaded"
            except UserError as e:
                assert str(e) and "\n" not in str(e), (label, flag, str(e))
                outcome = type(e).__name__
            except Exception as e:  # noqa: BLE001 (what the test is for)
                pytest.fail(f"{label} through {flag}: {type(e).__name__}: {e}")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        path.unlink()
    return outcomes


def _groups(corpus):
    lora, embedding, model = (Path(corpus[k]).read_bytes() for k in ("lora", "embedding", "model"))
    return {"cuts": lambda: [*cuts(lora), *cuts(embedding), *cuts(model, sample=MODEL_CUTS, sparse=True)],
            "junk": lambda: [*junk(lora, 4), *junk(embedding, 5), *junk(model, 6, sparse=True)],
            "lora mutations": lambda: list(mutations(lora, MUTATIONS, 1)),
            "embedding mutations": lambda: list(mutations(embedding, MUTATIONS, 2)),
            "model mutations": lambda: list(mutations(model, MODEL_MUTATIONS, 3, sparse=True))}


@pytest.mark.parametrize("group", ["cuts", "junk", "lora mutations", "embedding mutations", "model mutations"])
def test_the_corpus_gives_only_user_errors(corpus, group, no_big_allocations):
    """Only UserError (or a model that loads), no tensor bigger than its file, and little memory: the Python
    objects stay small (tracemalloc, which slows thousands of cases tenfold: there only the RSS)."""
    cases = _groups(corpus)[group]()
    traced = group not in ("cuts", "model mutations")
    if traced:
        tracemalloc.start()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = _run(corpus, cases)
    peak = tracemalloc.get_traced_memory()[1] if traced else 0
    tracemalloc.stop()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
    print(f"\n{group}: {len(cases)} cases, {sum(outcomes.values())} reads: {outcomes}; Python peak "
          f"{peak / 2**20:.1f} MiB, RSS grew {grown / 2**20:.1f} MiB")
    assert outcomes["UserError"] > 0.9 * sum(outcomes.values())
    assert peak < 32 * 2**20 and grown < 256 * 2**20


# ---------------------------------------------------------------------------------------------------
# The issue's ten files, one line each, naming the file and the tensor


ISSUE_MESSAGES = {"missing data_offsets": "has no data_offsets", "entry not an object": "is a JSON list, not an object",
                  "header a JSON list": "its header is a JSON list", "shape a string": "not a list of non-negative",
                  "40 TB promise": "40000000000000 bytes", "20 GB promise, offsets agreeing": "is truncated",
                  "NaN LoRA": "holds NaN or infinite values", "bytes not matching the shape": "hold 256",
                  "offsets backwards": "not [begin, end] with 0 <= begin <= end", "dtype not a string": "not a string"}


@pytest.mark.parametrize("flag", ["--lora", "--embedding", "--model"])
def test_the_issues_files_through_sample_py(corpus, flag, tmp_path, capsys, monkeypatch, no_big_allocations):
    if flag != "--model":  # the model is the tiny one each time: load it once
        monkeypatch.setattr(dreambooth_min, "load", lambda *a, **kw: copy.copy(corpus["sd"]))
    cases = issue_cases(corpus["lora"])
    assert set(cases) == set(ISSUE_MESSAGES)
    name = next(k for k in _split(corpus["lora"].read_bytes())[0] if k.endswith("lora_down.weight"))
    for label, data in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        out = tmp_path / "out.png"
        model = [] if flag == "--model" else ["--model", str(corpus["model"])]
        assert sample.main(model + [flag, str(path), "--prompt", "a dog", "--steps", "2", "--height", "32",
                                    "--width", "32", "--no-progress", "--out", str(out)]) == 2, label
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, (label, err)
        if flag != "--lora" and label == "NaN LoRA":  # its names and shapes say what it is, before any value is read
            assert "is a LoRA file, not a model" in err if flag == "--model" else "not a textual-inversion" in err
            continue
        assert ISSUE_MESSAGES[label] in err and str(path) in err, (label, err)
        assert label == "header a JSON list" or name in err, (label, err)
        assert not out.exists()


def test_a_nan_embedding_through_sample_py(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dreambooth_min, "load", lambda *a, **kw: copy.copy(corpus["sd"]))
    data = bytearray(corpus["embedding"].read_bytes())
    data[-4:] = np.array([np.inf], dtype=np.float32).tobytes()
    path = tmp_path / "inf.safetensors"
    path.write_bytes(bytes(data))
    assert sample.main(["--model", str(corpus["model"]), "--embedding", str(path), "--prompt", "<s0><s1>",
                        "--no-progress", "--out", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: tensor emb_params holds NaN or infinite values: the file is damaged or was saved " \
                  "from a training that diverged (it would draw black images)"


def test_a_nan_in_a_model_file_names_the_tensor(corpus, tmp_path):
    header, body = _split(Path(corpus["model"]).read_bytes())
    name = "model.diffusion_model.out.2.weight"
    begin = header[name]["data_offsets"][0]
    body = bytearray(body)
    body[begin:begin + 4] = np.array([np.inf], dtype=np.float32).tobytes()
    path = tmp_path / "poisoned.safetensors"
    path.write_bytes(_file(header, bytes(body)))
    with pytest.raises(NonFinite, match=f"{path}: tensor {name} holds NaN or infinite values"):
        dreambooth_min.load(path)


def test_is_finite_without_a_false_alarm():
    big = torch.full((1000,), 3e38)  # finite, but its float32 sum overflows
    assert safetensors_io.is_finite(big) and safetensors_io.is_finite(big.half().clamp(-6e4, 6e4))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.zeros(10, dtype=dtype)
        assert safetensors_io.is_finite(t)
        t[7] = float("nan")
        assert not safetensors_io.is_finite(t)
        t[7] = -float("inf")
        assert not safetensors_io.is_finite(t)
    assert safetensors_io.is_finite(torch.tensor([2**62]))  # integers are always finite


# ---------------------------------------------------------------------------------------------------
# No black image: latents or VAE output gone non-finite


def test_an_exploding_lora_leaves_no_black_png(corpus, tmp_path, capsys):
    """Finite factors so large (too high a learning rate) that the merged weights overflow: the latents go NaN."""
    tensors = {k: v * 1e20 if "lora_" in k else v for k, v in _lora_tensors(corpus["sd"]).items()}
    save_lora(tmp_path / "exploded.safetensors", tensors)
    out = tmp_path / "out.png"
    assert sample.main(["--model", str(corpus["model"]), "--lora", str(tmp_path / "exploded.safetensors"),
                        "--prompt", "a dog", "--steps", "2", "--height", "32", "--width", "32", "--num-images", "2",
                        "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the latents went NaN or infinite") and "poisoned LoRA" in err
    assert "too high a learning rate" in err and "\n" not in err
    assert not list(tmp_path.glob("*.png"))


def test_a_vae_overflow_is_named(corpus, monkeypatch):
    from dreambooth_min import sampling

    sd = copy.copy(corpus["sd"])
    monkeypatch.setattr(sd, "vae", copy.deepcopy(sd.vae))
    monkeypatch.setattr(sd.vae, "decode", lambda z: torch.full((1, 3, 32, 32), float("inf")))
    with pytest.raises(NonFinite, match="the VAE's output went NaN or infinite.*VAE overflowed in float32"):
        sampling.decode(sd, torch.zeros(1, 4, 4, 4))


def test_validation_warns_and_skips_the_images(corpus, tmp_path, monkeypatch, capsys):
    from dreambooth_min import sampling

    monkeypatch.setattr(sampling, "ddim_sample", lambda unet, x_T, *a, **kw: torch.full_like(x_T, float("nan")))
    cfg = config(tmp_path, corpus["model"], steps=2, validate_every=1, validation_images=1, validation_steps=2,
                 prior_weight=0.0)
    messages = []
    result = train(cfg, log=messages.append)
    out = capsys.readouterr()
    lines = [m for m in messages + (out.out + out.err).splitlines() if m.startswith("warning: validation")]
    assert lines and all("NonFinite: the latents went NaN or infinite" in m and "training goes on" in m for m in lines)
    assert Path(result["lora"]).is_file()  # the run went on to its end
    assert not list((Path(cfg.output) / "samples").rglob("epoch_*.png"))


# ---------------------------------------------------------------------------------------------------
# train.py --resume over a hostile checkpoint: the one before it is used


def _poison(path):
    """The LoRA at `path` with one NaN in its first factor."""
    header, body = _split(path.read_bytes())
    name = next(k for k in sorted(header) if k.endswith("lora_down.weight"))
    body = bytearray(body)
    begin = header[name]["data_offsets"][0]
    body[begin:begin + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    return _file(header, bytes(body)), name


def test_resume_passes_over_a_hostile_checkpoint(corpus, tmp_path):
    import dataclasses

    cfg = config(tmp_path, corpus["model"], steps=6, prior_weight=0.0, save_every=2)
    train(cfg, stop_after=5, log=lambda m: None)  # checkpoints 4 and 5
    lora = Path(cfg.output) / "checkpoints" / "step_000005" / "lora.safetensors"
    poisoned, name = _poison(lora)
    header, body = _split(lora.read_bytes())
    cases = {"NaN, manifest agreeing": (poisoned, f"tensor {name} holds NaN"),
             "entry not an object, manifest agreeing": (_file(dict(header, **{name: [1]}), body), "not an object")}
    # (a file whose manifest is stale, cut or changed: tests/test_faults.py)
    for label, (data, why) in cases.items():
        run = tmp_path / label.replace(" ", "_").replace(",", "")
        shutil.copytree(cfg.output, run)
        hostile = run / "checkpoints" / "step_000005" / "lora.safetensors"
        hostile.write_bytes(data)
        if "agreeing" in label:  # a manifest vouching for the file, as if copied in by hand
            manifest_path = hostile.parent / MANIFEST
            manifest = json.loads(manifest_path.read_text())
            manifest["files"]["lora.safetensors"] = {"bytes": len(data), "sha256": sha256(hostile)}
            manifest_path.write_text(json.dumps(manifest))
        messages = []
        result = train(dataclasses.replace(cfg, output=str(run)), resume=True, log=messages.append)
        warnings = [m for m in messages if m.startswith("warning:")]
        assert len(warnings) == 1 and "step_000005" in warnings[0] and why in warnings[0], (label, messages)
        assert any(m.startswith("resumed from") and "step_000004" in m for m in messages), (label, messages)
        assert load_lora(result["lora"])[0].keys() == load_lora(lora)[0].keys()  # steps 5 and 6 redone


def test_openclips_causal_mask_is_not_a_poison(tiny_sd2, tmp_path):
    """OpenCLIP checkpoints may keep `attn_mask`, -inf above the diagonal by design: it is not read."""
    header, body = _split(Path(tiny_sd2["single"]).read_bytes())
    mask = torch.full((77, 77), float("-inf")).triu(1)
    header["cond_stage_model.model.attn_mask"] = {"dtype": "F32", "shape": [77, 77],
                                                  "data_offsets": [len(body), len(body) + mask.numel() * 4]}
    path = tmp_path / "with_mask.safetensors"
    path.write_bytes(_file(header, body + mask.numpy().tobytes()))
    assert dreambooth_min.load(path).version == "sd2"
