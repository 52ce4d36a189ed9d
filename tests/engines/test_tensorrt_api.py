"""Static check: every TensorRT name the backend uses exists in the real Python bindings.

TensorRT cannot be imported without libnvinfer and a GPU, but the bindings wheel
(``tensorrt-cu13-bindings`` 11.4, about 1.3 MB, no dependencies) holds the
pybind11 names as strings in ``tensorrt_bindings/tensorrt.so`` and the Python
helpers (``nptype``, ``__version__``) in its ``__init__.py``. The test downloads
it once with ``pip download --no-deps`` into pytest's cache (it is not a dev
dependency: it installs ``tensorrt_bindings/``, the same folder a real TensorRT
install owns, and would overwrite it). Offline, the wheel tests skip with the
reason. The 10.16 wheel is checked the same way, since kiln supports both.

Names are collected from engines/backends/tensorrt/*.py with ``ast``: attribute
chains on the module alias ``trt`` and members used on variables that hold
TensorRT objects (``METHODS_USED`` lists them by class; the test keeps that
table and the code in step). Names TensorRT 11 removed (shared/docs/TENSORRT.md
section 7) may appear only under a ``hasattr``/version guard.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.fakes import tensorrt as fake_tensorrt
from tests.fakes.cudart import FakeCudaRuntime

BACKEND = Path(__file__).resolve().parents[2] / "engines" / "backends" / "tensorrt"

WHEELS = {
    "11.4": ("tensorrt-cu13-bindings", "11.4.0.106"),
    "10.16": ("tensorrt-cu12-bindings", "10.16.1.11"),
}

TRT_ALIAS = "trt"
TRT_OBJECT_VARIABLES = {
    "builder",
    "network",
    "tensor",
    "parser",
    "error",
    "config",
    "profile",
    "cache",
    "disk_cache",
    "runtime",
    "engine",
    "_engine",
    "inspector",
    "context",
    "layer",
}
"""Variable (or attribute) names that hold TensorRT objects in the backend."""

METHODS_USED = {
    "Builder": {
        "create_network",
        "create_builder_config",
        "create_optimization_profile",
        "build_serialized_network",
    },
    "INetworkDefinition": {"num_inputs", "get_input", "num_outputs", "get_output", "num_layers"},
    "ITensor": {"name", "shape", "dtype"},
    "OnnxParser": {"parse", "num_errors", "get_error"},
    "ParserError": {"code", "node", "node_name", "node_operator", "desc"},
    "IBuilderConfig": {
        "set_memory_pool_limit",
        "builder_optimization_level",
        "profiling_verbosity",
        "add_optimization_profile",
        "create_timing_cache",
        "set_timing_cache",
        "get_timing_cache",
    },
    "ITimingCache": {"combine", "serialize"},
    "IOptimizationProfile": {"set_shape"},
    "Runtime": {"deserialize_cuda_engine"},
    "ICudaEngine": {
        "create_engine_inspector",
        "create_execution_context",
        "num_layers",
        "num_io_tensors",
        "get_tensor_name",
        "get_tensor_mode",
        "get_tensor_dtype",
        "get_tensor_shape",
        "get_tensor_profile_shape",
        "is_shape_inference_io",
    },
    "IEngineInspector": {"get_engine_information"},
    "IExecutionContext": {
        "set_input_shape",
        "infer_shapes",
        "get_tensor_shape",
        "set_tensor_address",
        "execute_async_v3",
    },
}
"""What the backend calls on objects it gets from TensorRT, by class."""

# TENSORRT.md section 7 (and the removals of section 2 it includes).
REMOVED_DISTINCTIVE = {
    "EXPLICIT_BATCH",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
    "REJECT_EMPTY_ALGORITHMS",
    "WEIGHTLESS",
    "IInt8Calibrator",
    "IInt8LegacyCalibrator",
    "IInt8EntropyCalibrator",
    "IInt8EntropyCalibrator2",
    "IInt8MinMaxCalibrator",
    "CalibrationAlgoType",
    "int8_calibrator",
    "set_calibration_profile",
    "get_calibration_profile",
    "QuantizationFlag",
    "dynamic_range",
    "set_output_type",
    "platform_has_fast_fp16",
    "platform_has_fast_int8",
    "platform_has_tf32",
    "IAlgorithmSelector",
    "algorithm_selector",
    "CUBLAS_LT",
    "get_device_memory_size_for_profile",
    "weight_streaming_budget",
    "create_execution_context_without_device_memory",
    "has_implicit_batch_dimension",
    "all_shape_inputs_specified",
    "IStreamReader",
    "parse_with_weight_descriptors",
    "get_plugin_creator",
    "PROFILE_SHARING_0806",
    "MULTIDEVICE_RUNTIME_10_16",
}
"""Removed names that mean TensorRT wherever they appear."""

REMOVED_ON_TRT_OBJECTS = {
    "FP16",
    "BF16",
    "INT8",
    "FP8",
    "INT4",
    "FP4",
    "CUBLAS",
    "CUDNN",
    "precision",
    "device_memory_size",
    "supports_model",
}
"""Removed names too generic to flag everywhere: flagged on ``trt.*`` chains and TensorRT objects."""


# -- reading the real bindings -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bindings:
    version: str
    shared_object: bytes
    init_py: str
    identifiers: frozenset[bytes]

    @classmethod
    def from_wheel(cls, wheel: Path, version: str) -> Bindings:
        with zipfile.ZipFile(wheel) as archive:
            shared_object = archive.read("tensorrt_bindings/tensorrt.so")
            init_py = archive.read("tensorrt_bindings/__init__.py").decode()
        identifiers = frozenset(re.findall(rb"[A-Za-z_][A-Za-z0-9_]*", shared_object))
        return cls(version, shared_object, init_py, identifiers)

    def has(self, name: str) -> bool:
        """Whether ``name`` is an identifier string in the .so or defined in ``__init__.py``.

        The linker merges string tails, so a name may only exist as the end of a
        longer string: a NUL-terminated suffix counts as present.
        """
        encoded = name.encode()
        if encoded in self.identifiers or encoded + b"\0" in self.shared_object:
            return True
        definition = rf"^(def {re.escape(name)}\(|{re.escape(name)} = )"
        return re.search(definition, self.init_py, re.MULTILINE) is not None


def _download_wheel(cache_dir: Path, distribution: str, version: str) -> Path:
    pattern = f"{distribution.replace('-', '_')}-{version}-*.whl"
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[0]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--python-version",
        "3.11",
        "--platform",
        "manylinux_2_28_x86_64",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(cache_dir),
        f"{distribution}=={version}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not run pip to download {distribution}=={version}: {exc}")
    found = sorted(cache_dir.glob(pattern))
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"could not download {distribution}=={version} (offline?): {tail[0]}")
    return found[0]


_LOADED: dict[str, Bindings] = {}


def load_bindings(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, key: str) -> Bindings:
    if key not in _LOADED:
        cache = getattr(config, "cache", None)
        cache_dir = (
            cache.mkdir("tensorrt-bindings-wheels")
            if cache is not None
            else tmp_path_factory.mktemp("wheels")
        )
        distribution, version = WHEELS[key]
        _LOADED[key] = Bindings.from_wheel(_download_wheel(Path(cache_dir), distribution, version), version)
    return _LOADED[key]


@pytest.fixture(scope="session", params=sorted(WHEELS), ids=lambda v: f"tensorrt-{v}")
def bindings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Bindings:
    return load_bindings(request.config, tmp_path_factory, request.param)


@pytest.fixture(scope="session")
def bindings_11(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Bindings:
    return load_bindings(pytestconfig, tmp_path_factory, "11.4")


# -- reading the backend -----------------------------------------------------------------


def backend_tree() -> ast.Module:
    """Every module of the backend package as one tree."""
    body: list[ast.stmt] = []
    for path in sorted(BACKEND.glob("*.py")):
        body.extend(ast.parse(path.read_text(), filename=str(path)).body)
    return ast.Module(body=body, type_ignores=[])


def _chain(node: ast.Attribute) -> tuple[ast.expr, list[str]]:
    names: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        names.append(current.attr)
        current = current.value
    return current, names


def trt_module_names(tree: ast.AST) -> set[str]:
    """Every name in an attribute chain rooted at ``trt`` (``trt.ILogger.Severity.ERROR``...)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            root, chain = _chain(node)
            if isinstance(root, ast.Name) and root.id == TRT_ALIAS:
                names.update(chain)
    return names


def _on_trt_object(node: ast.Attribute) -> bool:
    base = node.value
    if isinstance(base, ast.Name):
        return base.id in TRT_OBJECT_VARIABLES
    return isinstance(base, ast.Attribute) and base.attr in TRT_OBJECT_VARIABLES


def trt_object_members(tree: ast.AST) -> set[str]:
    """Members used on variables that hold TensorRT objects (``engine.get_tensor_name``...)."""
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and _on_trt_object(node)}


def tensorrt_aliases(tree: ast.AST) -> set[str]:
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(alias.asname or alias.name for alias in node.names if alias.name == "tensorrt")
        elif isinstance(node, ast.ImportFrom) and node.module == "tensorrt":
            aliases.add("from tensorrt import ...")
    return aliases


def _is_guard(test: ast.expr) -> bool:
    for node in ast.walk(test):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "__version__":
            return True
        if isinstance(node, ast.Name) and ("version" in node.id.lower() or "major" in node.id.lower()):
            return True
    return False


def unguarded_removed_names(tree: ast.AST) -> list[str]:
    """Uses of names TensorRT 11 removed that are not under a hasattr or version check."""
    parents: dict[ast.AST, ast.AST] = {}
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            parents[child] = parent

    def guarded(node: ast.AST) -> bool:
        child, current = node, parents.get(node)
        while current is not None:
            if (
                isinstance(current, ast.If | ast.IfExp | ast.While)
                and child is not current.test
                and _is_guard(current.test)
            ):
                return True
            if isinstance(current, ast.BoolOp) and isinstance(current.op, ast.And):
                earlier = current.values[: current.values.index(child)] if child in current.values else []
                if any(_is_guard(value) for value in earlier):
                    return True
            child, current = current, parents.get(current)
        return False

    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            root, _ = _chain(node)
            on_trt = (isinstance(root, ast.Name) and root.id == TRT_ALIAS) or _on_trt_object(node)
            if node.attr in REMOVED_DISTINCTIVE or (on_trt and node.attr in REMOVED_ON_TRT_OBJECTS):
                name = node.attr
        elif isinstance(node, ast.Name) and node.id in REMOVED_DISTINCTIVE:
            name = node.id
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in REMOVED_DISTINCTIVE | REMOVED_ON_TRT_OBJECTS
        ):
            name = str(node.args[1].value)
        if name is not None and not guarded(node):
            found.append(f"line {getattr(node, 'lineno', '?')}: {name}")
    return found


# -- the checks ------------------------------------------------------------------------------


def test_tensorrt_is_only_imported_as_trt() -> None:
    assert tensorrt_aliases(backend_tree()) == {TRT_ALIAS}


def test_method_table_covers_every_member_the_backend_uses() -> None:
    used = trt_object_members(backend_tree())
    listed = set().union(*METHODS_USED.values())
    assert used - listed == set(), "add these to METHODS_USED (with their class) and check them"
    assert listed - used == set(), "METHODS_USED lists members the backend no longer uses"


def test_method_table_matches_the_fake_classes() -> None:
    """The table's class for each member is right as far as the fake (checked below) knows."""
    for class_name, members in METHODS_USED.items():
        klass = getattr(fake_tensorrt, class_name)
        fields = (
            {field.name for field in dataclasses.fields(klass)} if dataclasses.is_dataclass(klass) else set()
        )
        for member in members:
            assert hasattr(klass, member) or member in fields, f"{class_name}.{member}"


def test_every_module_level_name_exists_in_the_real_bindings(bindings: Bindings) -> None:
    names = trt_module_names(backend_tree())
    assert {"Builder", "OnnxParser", "Runtime", "ILogger", "nptype", "__version__"} <= names
    missing = sorted(name for name in names if not bindings.has(name))
    assert missing == [], f"not in TensorRT {bindings.version}'s bindings: {missing}"


def test_every_method_used_exists_in_the_real_bindings(bindings: Bindings) -> None:
    missing = sorted(
        f"{klass}.{member}"
        for klass, members in METHODS_USED.items()
        for member in members
        if not bindings.has(member) or not bindings.has(klass)
    )
    assert missing == [], f"not in TensorRT {bindings.version}'s bindings: {missing}"


def test_the_string_check_can_tell_removed_names_apart(bindings: Bindings) -> None:
    """Guards the check itself: names 11 removed are absent there and present in 10.16."""
    for name in ("EXPLICIT_BATCH", "IInt8EntropyCalibrator2", "platform_has_fast_fp16"):
        assert bindings.has(name) == bindings.version.startswith("10."), name
    assert not bindings.has("surely_not_a_tensorrt_name")


def test_nothing_removed_in_tensorrt_11_is_used_outside_a_guard() -> None:
    assert unguarded_removed_names(backend_tree()) == []


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("config.set_flag(trt.BuilderFlag.FP16)", ["FP16"]),
        ("flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)", ["EXPLICIT_BATCH"]),
        ("flag = getattr(trt.BuilderFlag, 'INT8')", ["INT8"]),
        ("class Calibrator(trt.IInt8EntropyCalibrator2): pass", ["IInt8EntropyCalibrator2"]),
        ("size = engine.device_memory_size", ["device_memory_size"]),
        ("if hasattr(trt.BuilderFlag, 'FP16'):\n    config.set_flag(trt.BuilderFlag.FP16)", []),
        ("if int(trt.__version__.split('.')[0]) < 11:\n    base = trt.IInt8EntropyCalibrator2", []),
        ("ok = hasattr(builder, 'platform_has_fast_fp16') and builder.platform_has_fast_fp16", []),
        ("precision = options.precision", []),
    ],
)
def test_the_guard_check_itself(source: str, flagged: list[str]) -> None:
    found = [entry.split(": ", 1)[1] for entry in unguarded_removed_names(ast.parse(source))]
    assert found == flagged


def test_the_fake_11_only_uses_names_of_the_real_11_4(bindings_11: Bindings) -> None:
    """Keeps the fake honest: a name it invents would let the backend pass here and fail on a GPU."""
    missing = sorted(name for name in fake_tensorrt.python_names_11() if not bindings_11.has(name))
    assert missing == [], f"the 11.x fake has names TensorRT 11.4 lacks: {missing}"


def _where_defined(module: object, name: str) -> list[str]:
    places = []
    for owner in (
        "",
        "BuilderFlag",
        "NetworkDefinitionCreationFlag",
        "Builder",
        "IBuilderConfig",
        "ICudaEngine",
        "IExecutionContext",
    ):
        target = getattr(module, owner) if owner else module
        if hasattr(target, name):
            places.append(f"{owner or 'tensorrt'}.{name}")
    return places


def test_the_fake_11_lacks_what_11_removed_and_the_fake_10_has_it() -> None:
    fake_11 = fake_tensorrt.FakeTensorRT("11.4.0.106", FakeCudaRuntime()).module
    fake_10 = fake_tensorrt.FakeTensorRT("10.16.1.11", FakeCudaRuntime()).module
    for name in fake_tensorrt.REMOVED_IN_11:
        assert _where_defined(fake_11, name) == [], name
        assert _where_defined(fake_10, name) != [], name
    assert set(fake_tensorrt.REMOVED_IN_11) <= REMOVED_DISTINCTIVE | REMOVED_ON_TRT_OBJECTS
