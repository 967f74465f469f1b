"""report.html, the run on one page: its charts (laid out once, SVG and PNG), its sections from a run
folder's files, and a tiny run's page opened in headless Chromium (skipped where none is installed)."""
import json
from pathlib import Path

import pytest
from PIL import Image

from browser import Browser, find_chromium
from dreambooth_min.formats.png import save_png
from dreambooth_min.run.training import train
from dreambooth_min.watch import page, plots
from test_training import config


def test_ticks_are_round_and_cover_the_range():
    assert plots.nice_ticks(0.0123, 0.0456) == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert plots.nice_ticks(1, 6, n=6) == [1, 2, 3, 4, 5, 6]
    assert plots.nice_ticks(0, 1e-4) == [0.0, 5e-5, 1e-4]
    flat = plots.nice_ticks(1e-3, 1e-3)  # a constant learning rate still gets an axis around it
    assert flat[0] < 1e-3 < flat[-1]
    assert [plots.tick_label(v, flat) for v in flat] == ["9.50e-04", "1.00e-03", "1.05e-03"]
    assert [plots.tick_label(v, [0.2, 0.4]) for v in (0.2, 0.4)] == ["0.2", "0.4"]
    assert plots.moving_average([1.0, 0.0, 0.0]) == pytest.approx([1.0, 0.9, 0.81])


def test_loss_chart_has_axes_ticks_and_a_legend_in_svg_and_png(tmp_path):
    records = [{"step": s, "epoch": s / 3, "loss": 1.0 / s, "lr": 1e-4 * s / 6} for s in range(1, 7)]
    chart = plots.loss_chart(records, marks=[(3, "resumed")])
    svg = chart.svg()
    for text in ("optimizer step", "loss (MSE of the prediction)", ">learning rate<", "loss per step",
                 "moving average (0.9)", "resumed", ">1.0<", ">0.5<", ">6<", ">1.0e-04<"):
        assert text in svg, text
    lines = [s for s in chart.shapes if s[0] == "line" and s[2] == plots.RAW]
    (x1, y1), (x6, y6) = lines[0][1][0], lines[0][1][-1]  # loss 1 at step 1, 1/6 at step 6; axes 1..6, 0..1
    assert (x1, y1, x6) == (70, 24, 780) and y6 == pytest.approx(220 - 196 / 6, abs=0.1)  # the panel: y 24..220
    plots.plot_loss(records, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as im:
        assert im.size == (800, 400) and im.convert("L").getextrema()[0] < 100  # drawn in dark ink


def _fake_run(tmp_path, validate=True):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"model": "m.safetensors"}, "resolved": {
        "model": "weights/m.safetensors", "prompt": "a photo of sks dog", "resolution": 32,
        "validation_prompt": "v", "class_prompt": "a photo of dog"}}))
    (run / "plan.txt").write_text("model       m.safetensors\nlearns      'a photo of <sks> dog'\n")
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 3, "loss": 1 / s, "lr": 1e-4}) + "\n"
                                           for s in range(1, 7)))
    prompt = 'a <b>sks</b> dog & "friends"'
    for epoch in (0, 2) if validate else ():
        for name, text in (("0", prompt), ("1", prompt), ("class_0", "a photo of dog")):
            save_png(Image.new("RGB", (32, 32), "red"), run / "samples" / f"epoch_{epoch:04d}" / f"{name}.png",
                     f"{text}\nSteps: 2, Seed: 3")
    return run, prompt


def test_page_of_a_run_folder(tmp_path):
    run, prompt = _fake_run(tmp_path)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"epoch": 0, "step": 0, "dino": 0.1, "clip_t": 0.30, "clip_i": 0.5, "pres": 0.4, "div": 0.3},
        {"epoch": 2, "step": 6, "dino": 0.6, "clip_t": 0.295, "clip_i": 0.7, "pres": 0.4, "div": 0.2})))
    events = [{"event": "interrupted", "step": 3, "checkpoint": "checkpoints/step_000003",
               "resume": "python train.py --resume run"}]
    (run / "events.jsonl").write_text(json.dumps(events[0]) + "\n")
    html = page.render(run)
    assert "status\">interrupted at step 3; continue with <code>python train.py --resume run</code>" in html
    events.append({"event": "resumed", "step": 3, "checkpoint": "checkpoints/step_000003", "stopped_at": 4})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "lora.safetensors").write_bytes(b"x" * 3000)
    page.write_report(run)
    html = (run / "report.html").read_text()
    assert "<script" not in html and "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "a &lt;b&gt;sks&lt;/b&gt; dog &amp; &quot;friends&quot;" in html and prompt not in html
    assert "learns      &#x27;a photo of &lt;sks&gt; dog&#x27;" in html  # the plan, escaped
    assert html.index("epoch 2, step 6") < html.index("epoch 0, step 0: the base model")  # newest first
    assert html.count('src="samples/epoch_0002/') == 3 and 'src="samples/epoch_0002/class_0.png"' in html
    assert '<tr class="best"><td>2 (best)</td><td>6</td><td>0.6000</td>' in html  # DINO 0.6, CLIP-T within 0.01
    assert html.count("<svg") == 1 + 5  # the loss and learning rate; a small plot per metric
    assert "finished at step 6" in html and "0.00 MiB (3,000 bytes)" in html
    assert ("python sample.py --model weights/m.safetensors --lora " + str(run / "lora.safetensors")
            + " --prompt 'a photo of sks dog on the beach' --height 32 --width 32") in html.replace("&#x27;", "'")
    assert "resumed at step 3 from checkpoints/step_000003 (it had stopped after step 4)" in html


def test_page_without_validation_images(tmp_path):
    run, _ = _fake_run(tmp_path, validate=False)
    html = page.render(run)
    assert "no validation images" in html and "<img" not in html and "Metrics" not in html
    assert "in progress" in html and "not written yet" in html


def _opened(browser, path):
    browser.open(path)
    return browser.evaluate("""(() => {
        const box = e => e ? e.getBoundingClientRect() : {width: 0, height: 0};
        const seen = e => !!e && box(e).width > 0 && box(e).height > 0 && getComputedStyle(e).visibility !== 'hidden';
        return {images: [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth]),
                loss: seen(document.querySelector('.loss svg')), epochs: [...document.querySelectorAll('.epoch')]
                .filter(seen).length, title: document.title}; })()""")


def test_a_tiny_runs_page_in_chromium(tiny_sd1, tmp_path):
    cfg = config(tmp_path, tiny_sd1["single"], steps=6, validate_every=1, validation_images=2, validation_steps=2,
                 prior_weight=0.0)
    assert train(cfg, stop_after=3)["interrupted"]
    report = Path(cfg.output) / "report.html"
    assert "interrupted at step 3" in report.read_text()
    train(cfg, resume=True)
    html = report.read_text()
    assert "finished at step 6" in html and "resumed at step 3" in html and html.count("<img") == 3 * 2
    assert (Path(cfg.output) / "plan.txt").read_text().startswith("model ")
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium): the page was not opened in a browser")
    with Browser(executable) as browser:
        seen = _opened(browser, report)
        assert browser.console_errors() == []
        assert len(seen["images"]) == 6 and all(width and width > 0 for _, width in seen["images"]), seen
        assert seen["loss"] and seen["epochs"] == 3, seen  # epochs 0 (the base model), 1 and 2
        (Path(cfg.output) / "samples" / "epoch_0001" / "1.png").unlink()  # the checks can fail: a missing image
        seen = _opened(browser, report)
        assert [src for src, width in seen["images"] if not width] == ["samples/epoch_0001/1.png"]
        assert any("epoch_0001/1.png" in e for e in browser.console_errors())


def test_a_run_without_validation_gets_its_page_too(tiny_sd1, tmp_path):
    cfg = config(tmp_path, tiny_sd1["single"], steps=2, validate_every=0, prior_weight=0.0)
    train(cfg)
    html = (Path(cfg.output) / "report.html").read_text()
    assert "finished at step 2" in html and "no validation images" in html and "<img" not in html
    assert "<pre>model " in html and html.count("<svg") == 1


def test_a_full_disk_while_writing_the_page_is_a_warning(tiny_sd1, tmp_path, monkeypatch, capsys):
    from test_faults import FullDisk

    cfg = config(tmp_path, tiny_sd1["single"], steps=2, validate_every=0, prior_weight=0.0)
    FullDisk(monkeypatch, "report.html")
    assert not train(cfg)["interrupted"]
    run = Path(cfg.output)
    assert (run / "lora.safetensors").is_file() and not (run / "report.html").exists()
    assert not list(run.glob(".*.tmp"))  # nothing half-written left behind
    assert "warning: " + str(run / "report.html") + " not written (DiskFull" in capsys.readouterr().out
