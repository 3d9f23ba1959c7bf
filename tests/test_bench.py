"""bench/: the data-pipeline benchmark runs in smoke mode and edits only its own docs section (no timing asserted)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_data_pipeline_smoke_writes_its_section(tmp_path):
    bench = _load("data_pipeline")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Training throughput\n\nkeep me\n\n## Data pipeline\n\nold\n\n## Memory\n\nme too\n")
    assert bench.main(["--smoke", "--sizes", "64", "--workdir", str(tmp_path / "work"), "--write", str(doc)]) == 0
    text = doc.read_text()
    assert "keep me" in text and "me too" in text and "\nold\n" not in text
    assert text.count("## Data pipeline") == 1 and text.index("## Training") < text.index("## Data pipeline")
    rows = [line for line in text.splitlines() if line.startswith("| blip")]
    assert [r.split("|")[1].strip() for r in rows] == ["blip_image_train", "blip2_image_train", "blip_image_eval"]
    assert all(r.rstrip(" |").endswith("x") for r in rows)
    assert "python bench/data_pipeline.py --smoke" in text
    assert len(os.listdir(tmp_path / "work" / "jpegs")) == 4
