"""The build itself: the extension loads against this torch, backends() reports, mismatches are
refused. (The CUDA sources' nvcc compile check lives in test_aot.py with the Triton kernels'.)"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm_fast
from ddpm_fast import _backends

ROOT = Path(__file__).resolve().parent.parent


def test_backends_reports_every_backend_with_a_reason():
    result = ddpm_fast.backends()
    assert set(result) == {"reference", "cpp", "cuda", "triton"}
    for available, reason in result.values():
        assert isinstance(available, bool) and reason
    assert result["reference"][0]


def test_extension_is_built_against_this_torch():
    ext = _backends.load_extension()
    if ext is None:
        pytest.skip("built with DDPM_FAST_BUILD_EXT=0")
    assert ext.torch_version == torch.__version__
    assert ext.with_cuda == (torch.version.cuda is not None and ext.with_cuda)
    assert hasattr(torch.ops.ddpm_fast_C, "q_sample") and hasattr(torch.ops.ddpm_fast_C, "posterior_step")


def test_extension_from_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(_backends, "_built_torch_version", lambda: "1.0.0+other")
    _backends.reset_caches()
    try:
        with pytest.raises(ImportError, match=r"1\.0\.0\+other.*" + re.escape(torch.__version__)):
            _backends.load_extension()
    finally:
        monkeypatch.undo()
        _backends.reset_caches()
        _backends.load_extension()


def test_unknown_and_unavailable_backends_are_clear_errors():
    with pytest.raises(ValueError, match="valid: reference, cpp, cuda, triton"):
        _backends.select_backend("fast", torch.device("cpu"))
    if not ddpm_fast.backends()["cuda"][0]:
        with pytest.raises(RuntimeError, match="not available"):
            _backends.select_backend("cuda", torch.device("cpu"))


def test_elementwise_default_on_cuda_follows_the_size(monkeypatch):
    """q_sample/posterior_step on CUDA by default: the CUDA C++ kernels while a call is bound by
    its launch, Triton above; an explicit backend stands; CPU choices are untouched; float64
    never goes to Triton by default."""
    monkeypatch.setattr(_backends, "select_backend", lambda requested, device: requested or "triton")
    monkeypatch.setattr(_backends, "_cuda_cpp_available", lambda: True)
    cuda, below = torch.device("cuda"), _backends.ELEMENTWISE_CUDA_CPP_BELOW
    for op in ("q_sample", "posterior_step"):
        assert _backends.choose(op, None, cuda, numel=256 * 3 * 32 * 32) == "cuda"
        assert _backends.choose(op, None, cuda, numel=below) == "triton"
        assert _backends.choose(op, None, cuda, numel=10, launch_bound=False) == "triton"  # a CUDA graph
        assert _backends.choose(op, None, cuda, numel=below, dtype=torch.float64) == "cuda"
        assert _backends.choose(op, "triton", cuda, numel=10) == "triton"
        assert _backends.choose(op, None, torch.device("cpu"), numel=10) == "triton"  # select_backend's choice
    assert _backends.choose("group_norm_silu", None, cuda, numel=10) == "triton"  # it has no CUDA C++ kernel
    assert _backends.choose("group_norm_silu", None, cuda, dtype=torch.float64) == "reference"
    with pytest.raises(TypeError, match="float64"):
        _backends.choose("q_sample", "triton", cuda, dtype=torch.float64)
    monkeypatch.setattr(_backends, "_cuda_cpp_available", lambda: False)  # _C built without CUDA
    assert _backends.choose("q_sample", None, cuda, numel=10) == "triton"


def test_group_norm_silu_default_on_cpu_is_the_cpp_kernel(monkeypatch):
    """On CPU, group_norm_silu's default is the C++ kernel for every shape, with or without gradients:
    the short NCHW rows (4x4 and below) that once trained through the reference now run a group at
    once in the C++ backward too (benchmarks/results/cpu-2026-12-06-groupnorm.json)."""
    cpu = torch.device("cpu")
    if _backends.select_backend(None, cpu) != "cpp":
        pytest.skip("cpp backend not built")
    from ddpm_fast import group_norm_silu

    seen = []
    real = _backends.choose

    def spy(op, requested, device, **kw):
        seen.append(real(op, requested, device, **kw))
        return seen[-1]

    import ddpm_fast.ops.groupnorm_silu as gn_module

    monkeypatch.setattr(gn_module, "choose", spy)
    x = torch.randn(2, 64, 4, 4)
    group_norm_silu(x, 32)
    group_norm_silu(x.requires_grad_(), 32)
    group_norm_silu(x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(), 32)
    assert seen == ["cpp", "cpp", "cpp"]


def test_op_backends_and_model_wide_names():
    """Each op names the backends it has; a model-wide backend maps to the op's own or its default."""
    with pytest.raises(ValueError, match=r"unknown backend 'cuda' for group_norm_silu \(no CUDA C\+\+ kernel"):
        _backends.choose("group_norm_silu", "cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend 'cpp' for attention.*no C\\+\\+ kernel"):
        _backends.choose("attention", "cpp", torch.device("cpu"))
    assert _backends.op_backend("attention", "cpp") is None
    assert _backends.op_backend("attention", "triton") == "triton"
    assert _backends.op_backend("group_norm_silu", "cuda") is None
    assert _backends.op_backend("group_norm_silu", "reference") == "reference"
    assert _backends.op_backend("q_sample", "cuda") == "cuda"


def test_isolated_build_stops_with_a_message(tmp_path):
    """setup.py run by an interpreter that cannot import torch (as in pip's isolated build)."""
    script = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = ['setup.py', 'build_ext', '--build-temp', {str(tmp_path)!r}]; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "DDPM_FAST_BUILD_EXT": "1"},
    )
    assert proc.returncode != 0
    assert "--no-build-isolation" in proc.stderr + proc.stdout


def test_build_info_matches_the_loaded_extension():
    info = ROOT / "ddpm_fast" / "_C_build_info.json"
    if not info.exists():
        pytest.skip("no extension built")
    assert json.loads(info.read_text())["torch_version"] == torch.__version__


def test_missing_extension_warns_once_and_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setitem(sys.modules, "ddpm_fast._C", None)  # makes `from . import _C` fail
    monkeypatch.delattr(ddpm_fast, "_C", raising=False)
    monkeypatch.setattr(_backends, "_built_torch_version", lambda: None)
    _backends.reset_caches()
    try:
        with pytest.warns(UserWarning, match="falling back to the PyTorch reference"):
            assert _backends.load_extension() is None
        assert ddpm_fast.backends()["cpp"] == (False, "ddpm_fast._C is not built")
        assert _backends.select_backend(None, torch.device("cpu")) == "reference"
        schedule = ddpm_fast.Schedule.from_config()
        x0 = torch.randn(2, 3, 4, 4)
        x_t, noise, _ = ddpm_fast.q_sample(x0, torch.tensor([1, 2]), schedule, noise=torch.ones_like(x0))
        assert torch.equal(noise, torch.ones_like(x0)) and x_t.shape == x0.shape
    finally:
        monkeypatch.undo()
        _backends.reset_caches()
        _backends.load_extension()


def _functions_using_vector_extensions(library: Path) -> dict[str, set[str]]:
    """{function: kinds} for the functions of ``library`` whose code uses AVX (VEX-encoded
    instructions, ymm registers) or AVX-512 (zmm or mask registers), from objdump's disassembly."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", str(library)], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, set[str]] = {}
    name = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            continue
        instruction = line.split("\t")[-1] if "\t" in line else ""
        kinds = set()
        if re.match(r"v[a-z]", instruction):
            kinds.add("avx")
        if "zmm" in instruction or re.search(r"%k[1-7]", instruction):
            kinds.add("avx512")
        if kinds and name is not None:
            found.setdefault(name, set()).update(kinds)
    return found


def test_vector_instructions_only_in_dispatched_builds():
    """The extension runs on any x86-64 CPU: AVX/AVX2 instructions appear only in functions built
    for AVX2 or AVX-512 (their names say so: *_avx2, RowsAvx2, *_avx512, ...), AVX-512 ones only in
    the AVX-512 builds, and cpu_isa() picks a build only where the CPU has it (no -march=native)."""
    import platform
    import shutil

    libraries = list(Path(ddpm_fast.__file__).parent.glob("_C*.so"))
    if platform.machine() != "x86_64" or not libraries or shutil.which("objdump") is None:
        pytest.skip("needs the built extension on x86-64 and objdump")
    functions = _functions_using_vector_extensions(libraries[0])
    offenders = []
    for function, kinds in functions.items():
        lowered = function.lower()
        if "avx512" in kinds and "avx512" not in lowered:
            offenders.append(f"AVX-512 in {function}")
        elif "avx512" not in lowered and "avx2" not in lowered:
            offenders.append(f"AVX in {function}")
    assert not offenders, "\n".join(offenders[:20])
    assert any("avx512" in kinds for kinds in functions.values()), "the AVX-512 builds are missing"
