"""The notebooks: the CPU quickstart runs end to end; the TPU notebook is checked statically.

Both are committed with outputs stripped, parse as Python once IPython magics and
shell lines are set aside, and use only names of the public API.
"""

import ast
import os
import re
from pathlib import Path

import nbformat
import pytest
from absl import flags
from nbclient import NotebookClient

import mixtral_jax as mj
from mixtral_jax import plan as plan_lib
import mixtral_jax.sample  # noqa: F401 - defines the sample CLI's flags

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
ALL = ["quickstart.ipynb", "tpu_8x7b.ipynb"]
# Generous for 2 shared CPU cores: the slowest cell (convert + load + compare) takes seconds on a laptop.
CELL_TIMEOUT_S = 300


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _code_cells(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _python_source(source: str) -> str:
    """The cell with each IPython magic (`%pip ...`) or shell line (`!ls`) replaced by `pass`.

    `pass` at the line's own indentation keeps a magic inside `try:` / `except:` valid Python.
    """
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        lines.append(line[:len(line) - len(stripped)] + "pass" if stripped[:1] in ("%", "!") else line)
    return "\n".join(lines)


@pytest.mark.parametrize("name", ALL)
def test_committed_with_outputs_stripped(name):
    for cell in _read(name).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name} is committed with outputs (cell starting {cell.source[:40]!r}); clear them first.")


@pytest.mark.parametrize("name", ALL)
def test_valid_notebook_whose_cells_parse_and_use_only_the_public_api(name):
    nb = _read(name)
    nbformat.validate(nb)
    used = set()
    for source in _code_cells(nb):
        tree = ast.parse(_python_source(source))
        used |= {node.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mj"}
    assert used, f"{name} never uses the `mj.` API"
    missing = sorted(n for n in used if n not in mj.__all__ or not hasattr(mj, n))
    assert not missing, f"{name} uses mj.{', mj.'.join(missing)}, not in mixtral_jax's public API"


@pytest.mark.parametrize("name", ALL)
def test_sample_cli_flags_exist(name):
    # Shell lines (`!python -m mixtral_jax.sample --dry_run ...`) and subprocess argument lists alike.
    for source in _code_cells(_read(name)):
        if "mixtral_jax.sample" in source:
            for flag in re.findall(r"--([a-z_]+)", source):
                assert flag in flags.FLAGS, f"{name} runs the sample CLI with --{flag}, which it does not define"


def test_tpu_notebook_reads_only_keys_the_dry_run_returns():
    # The notebook reads the dry run's JSON; a renamed key would fail there only on a TPU VM.
    source = "\n".join(_code_cells(_read("tpu_8x7b.ipynb")))
    used = set(re.findall(r"""plans?(?:\[\w+\])?\[["'](\w+)["']\]""", source))
    assert used, "the TPU notebook reads no key of the dry run's plan"
    keys = set(plan_lib.dry_run("tiny", "expert=2", max_seq_len=64, prompt_len=8))
    assert used <= keys, f"tpu_8x7b.ipynb reads {sorted(used - keys)}, which the dry run does not return"


def test_quickstart_runs_end_to_end(monkeypatch):
    nb = _read("quickstart.ipynb")
    # The kernel is a fresh process: PYTHONPATH lets it import this checkout (CI also installs it).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    stdout = "".join(out.text for out in outputs if out.output_type == "stream" and out.name == "stdout")
    assert "8 cpu devices" in stdout
    assert "row 0 alone equals row 0 in the batch: True" in stdout
    rel_err = float(re.search(r"relative error vs transformers: (\S+)", stdout).group(1))
    assert rel_err < 1e-4
    assert "greedy tokens equal transformers': True" in stdout
    assert "same tokens on 1 and on 8 devices: True" in stdout
    assert any("image/png" in out.get("data", {}) for out in outputs), "the routing plot was not shown"
    # Section 8: quantized weights take fewer bytes than float32, and int4 errs more than int8 against it.
    float_mib = float(re.search(r"float32: (\S+) MiB of weights", stdout).group(1))
    held, err = {}, {}
    for q in ("int8", "int4"):
        m = re.search(q + r": (\S+) MiB of weights; against float32: relative RMS logit error (\S+),", stdout)
        held[q], err[q] = float(m.group(1)), float(m.group(2))
    assert held["int4"] < held["int8"] < float_mib / 3
    assert 0 < err["int8"] < err["int4"] < 1
