"""Point the llama.cpp bindings at a folder of shared libraries (e.g. a CUDA build).

llama-cpp-python loads ``libllama`` once, when ``llama_cpp`` is first imported: from
``$LLAMA_CPP_LIB_PATH`` if set, else from the libraries bundled in the package. So
:func:`use_library_dir` must run **before anything imports llama_cpp** (in molink-lite:
``molink_lite.stage.engine``, ``.stage``, ``.split`` and everything that imports them). This
module itself imports neither llama_cpp nor numpy::

    from molink_lite.stage.libpath import use_library_dir, check_struct_sizes
    use_library_dir("kernels/build/cuda/lib")      # first!
    import llama_cpp                                # now loads that folder's libllama
    check_struct_sizes()                            # bindings vs. the build's C structs

Build such a folder with ``python kernels/build.py --backend cuda`` (see kernels/README.md);
it records the C ``sizeof`` of the structs the bindings pass by value in
``struct_sizes.json``, which :func:`check_struct_sizes` compares with the ctypes
definitions, so a library from another llama.cpp version is caught before it corrupts memory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

ENV = "LLAMA_CPP_LIB_PATH"
STRUCT_SIZES_FILE = "struct_sizes.json"

# the structs that must agree (the build records a few more; those are compared too)
REQUIRED_STRUCTS = (
    "llama_model_params",
    "llama_context_params",
    "llama_batch",
    "llama_sampler_chain_params",
    "llama_token_data",
)


class LibraryPathError(RuntimeError):
    """The library folder is unusable, or llama_cpp already loaded another library."""


class StructSizeMismatch(RuntimeError):
    """The Python bindings' struct layouts differ from those the library was built with."""


def library_names(platform: Optional[str] = None) -> List[str]:
    """File names under which llama-cpp-python looks for the llama library on this OS."""
    plat = platform or sys.platform
    if plat == "win32":
        return ["llama.dll", "libllama.dll"]
    if plat == "darwin":
        return ["libllama.so", "libllama.dylib"]
    return ["libllama.so"]


def find_library(path: Union[str, os.PathLike]) -> Optional[Path]:
    """The llama library file in folder ``path`` (the one llama_cpp would load), or None."""
    for name in library_names():
        cand = Path(path) / name
        if cand.is_file():
            return cand
    return None


def loaded_library() -> Optional[Path]:
    """Path of the llama library llama_cpp has loaded, or None if llama_cpp is not imported yet."""
    mod = sys.modules.get("llama_cpp.llama_cpp")
    lib = getattr(mod, "_lib", None) if mod is not None else None
    name = getattr(lib, "_name", None)
    return Path(name) if name else None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(str(a.resolve())) == os.path.normcase(str(b.resolve()))


def use_library_dir(path: Union[str, os.PathLike]) -> None:
    """Make llama_cpp load its libraries from folder ``path``; call before llama_cpp is imported.

    Checks that ``path`` is a folder holding the llama library for this OS (``libllama.so``,
    ``libllama.dylib``/``.so`` on macOS, ``llama.dll`` on Windows) and sets
    ``os.environ["LLAMA_CPP_LIB_PATH"]``, which llama_cpp reads when first imported.

    Raises :class:`LibraryPathError` if the folder is missing or holds no llama library,
    or if llama_cpp was already imported with a library from another folder (a process
    cannot switch: start a new one, or call this earlier). Calling it with the folder
    already in use is fine.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise LibraryPathError(f"llama library folder {str(p)!r} does not exist "
                               "(build one with: python kernels/build.py --backend cpu|cuda)")
    if not p.is_dir():
        raise LibraryPathError(f"{str(p)!r} is not a folder; pass the folder that holds "
                               f"{' or '.join(library_names())}")
    p = p.resolve()
    lib = find_library(p)
    if lib is None:
        present = sorted(f.name for f in p.iterdir())[:12]
        raise LibraryPathError(f"{str(p)!r} holds no llama library (looked for {', '.join(library_names())}; "
                               f"found: {', '.join(present) or 'nothing'}). Is it the --out folder of kernels/build.py?")
    loaded = loaded_library()
    if loaded is not None and not _same_dir(loaded.parent, p):
        raise LibraryPathError(
            f"llama_cpp is already imported and has loaded {loaded}; it cannot switch to {lib} in this "
            f"process. Call use_library_dir() before the first `import llama_cpp` (and before importing "
            f"molink_lite.stage.engine/stage/split), or set {ENV}={p} in the environment of a new process.")
    os.environ[ENV] = str(p)


def compare_struct_sizes(recorded: Mapping[str, object], bindings: Optional[object] = None) -> Dict[str, Dict[str, int]]:
    """Compare recorded C sizes (the content of ``struct_sizes.json``) with ctypes ``sizeof``.

    ``bindings``: the module holding the ctypes structs (default ``llama_cpp.llama_cpp``).
    Returns ``{struct: {"c": size, "python": size}}``; raises :class:`StructSizeMismatch`
    naming every struct that differs or is missing.
    """
    import ctypes

    if bindings is None:
        import llama_cpp.llama_cpp as bindings  # noqa: F811 - loads the library (LLAMA_CPP_LIB_PATH)
    structs = recorded.get("structs")
    if not isinstance(structs, Mapping) or not structs:
        raise StructSizeMismatch(f"{STRUCT_SIZES_FILE} has no 'structs' table")
    problems = []
    ptr = recorded.get("pointer")
    if ptr is not None and int(ptr) != ctypes.sizeof(ctypes.c_void_p):
        problems.append(f"pointer size: library {ptr} bytes, this Python {ctypes.sizeof(ctypes.c_void_p)} "
                        "(32-bit/64-bit mix)")
    result: Dict[str, Dict[str, int]] = {}
    for name in list(REQUIRED_STRUCTS) + [n for n in structs if n not in REQUIRED_STRUCTS]:
        if name not in structs:
            problems.append(f"{name}: not recorded by the build")
            continue
        cls = getattr(bindings, name, None)
        if cls is None:
            if name in REQUIRED_STRUCTS:
                problems.append(f"{name}: not defined by the Python bindings")
            continue
        c_size, py_size = int(structs[name]), ctypes.sizeof(cls)
        result[name] = {"c": c_size, "python": py_size}
        if c_size != py_size:
            problems.append(f"{name}: C sizeof {c_size} bytes, Python binding {py_size} bytes")
    if problems:
        lcp = recorded.get("llama_cpp_python", "unknown")
        mine = getattr(sys.modules.get("llama_cpp"), "__version__", "unknown")
        raise StructSizeMismatch(
            "the llama library and the llama-cpp-python bindings disagree on struct layouts:\n  "
            + "\n  ".join(problems)
            + f"\n(library built from llama-cpp-python {lcp}; bindings are {mine}). Rebuild the library from "
              f"the bindings' version: python kernels/build.py --lcp-version {mine} ...")
    return result


def check_struct_sizes(lib_dir: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Dict[str, int]]:
    """Load the library through llama_cpp and compare its structs with ``<lib_dir>/struct_sizes.json``.

    ``lib_dir`` defaults to the folder of the library llama_cpp loads (importing llama_cpp
    if needed, which reads ``$LLAMA_CPP_LIB_PATH``). If given, it must be the folder of the
    library actually loaded. Returns ``{struct: {"c": size, "python": size}}`` when all
    sizes match; raises :class:`StructSizeMismatch` (sizes differ) or
    :class:`LibraryPathError` (no ``struct_sizes.json``, or another library is loaded).
    """
    import llama_cpp  # noqa: F401 - loads the library

    loaded = loaded_library()
    if loaded is None:  # pragma: no cover - llama_cpp always sets _lib
        raise LibraryPathError("llama_cpp did not expose the loaded library (llama_cpp.llama_cpp._lib)")
    d = Path(lib_dir).expanduser() if lib_dir is not None else loaded.parent
    if lib_dir is not None and not (d.is_dir() and _same_dir(loaded.parent, d)):
        raise LibraryPathError(f"llama_cpp loaded {loaded}, not a library from {d}; call use_library_dir({str(d)!r}) "
                               "before importing llama_cpp")
    f = d / STRUCT_SIZES_FILE
    if not f.is_file():
        raise LibraryPathError(f"no {STRUCT_SIZES_FILE} in {d}: the struct sizes are recorded by kernels/build.py "
                               "(libraries from elsewhere, e.g. the llama-cpp-python wheel, have none)")
    try:
        recorded = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LibraryPathError(f"{f} is not valid JSON: {e}") from e
    return compare_struct_sizes(recorded)


class MissingSymbolError(LibraryPathError):
    """A C function molink-lite needs is exported by none of the libraries where it should be."""


def sibling_names(stem: str, platform: Optional[str] = None) -> List[str]:
    """File names of llama.cpp's library ``stem`` ("ggml-base", "ggml", "ggml-cpu") on this OS, the
    usual one first: ``ggml-base.dll`` (MSVC) or ``libggml-base.dll`` (MinGW) on Windows,
    ``libggml-base.dylib`` on macOS, ``libggml-base.so`` elsewhere."""
    plat = platform or sys.platform
    if plat == "win32":
        return [f"{stem}.dll", f"lib{stem}.dll"]
    if plat == "darwin":
        return [f"lib{stem}.dylib", f"lib{stem}.so"]
    return [f"lib{stem}.so"]


def library_dir() -> Optional[Path]:
    """The folder of the llama library llama_cpp loaded, or (not imported yet) the one it would load:
    ``$LLAMA_CPP_LIB_PATH``, else the package's own ``lib/``. Imports nothing."""
    loaded = loaded_library()
    if loaded is not None:
        return loaded.parent
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    import importlib.util

    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).parent / "lib" if spec is not None and spec.origin else None


def find_sibling(stem: str, folder: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    """The library ``stem`` in ``folder`` (default :func:`library_dir`), by this OS's file names, or None.
    On Linux a versioned name (``libggml-base.so.0``) counts where the plain one is missing."""
    d = Path(folder) if folder is not None else library_dir()
    if d is None or not d.is_dir():
        return None
    for name in sibling_names(stem):
        if (d / name).is_file():
            return d / name
    if sys.platform not in ("win32", "darwin"):
        versioned = sorted(d.glob(f"lib{stem}.so.*"), key=lambda p: len(p.name))
        if versioned:
            return versioned[0]
    return None


_CDLLS: Dict[str, object] = {}


def _cdll(path: Path):
    import ctypes

    key = os.path.normcase(str(path))
    if key not in _CDLLS:
        # the library is (or will be) loaded by llama_cpp's own libllama already: this only gets a handle to it
        _CDLLS[key] = ctypes.CDLL(str(path))
    return _CDLLS[key]


GGML_LIBRARIES = ("ggml-base", "ggml", "ggml-cpu")


def ggml_function(name: str, restype, argtypes: Sequence[object], libraries: Sequence[str] = GGML_LIBRARIES):
    """The C function ``name`` from the llama.cpp library that exports it, loaded from the folder of llama_cpp's
    library: ``libraries`` are tried in order (``"ggml-base"``: tensors, backends and devices; ``"ggml"``: the
    backend registry; ``"ggml-cpu"``), by this OS's file names, then the llama library itself.

    Each symbol has to be looked up in the library that exports it: Windows' ``GetProcAddress`` searches only
    the DLL given (``llama.dll`` exports no ``ggml_*``, ``ggml.dll`` has ``ggml_backend_dev_count`` but not
    ``ggml_backend_dev_name``), whereas Linux's ``dlsym`` on ``libllama.so`` also finds its dependencies'.
    Raises :class:`MissingSymbolError` saying where it looked."""
    import llama_cpp.llama_cpp as ll  # the llama library (and with it the ggml ones) is loaded first

    looked = []

    def holders():
        for stem in libraries:
            path = find_sibling(stem)
            if path is None:
                looked.append(f"no {' or '.join(sibling_names(stem))} in {library_dir()}")
                continue
            yield path.name, _cdll(path)
        yield Path(getattr(ll._lib, "_name", "llama")).name, ll._lib

    for label, lib in holders():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            looked.append(f"not exported by {label}")
            continue
        fn.restype, fn.argtypes = restype, list(argtypes)
        return fn
    raise MissingSymbolError(f"llama.cpp function {name} not found ({'; '.join(looked)}); this llama.cpp "
                             f"build does not fit molink-lite: install the pinned llama-cpp-python "
                             f"(molink-lite doctor says which wheel fits this machine)")


def llama_patch_function(name: str, restype, argtypes: Sequence[object]):
    """A function the project's patch set adds to the llama library (``kernels/patches/``), or None when the
    loaded library is a pristine build (pip's own source build, another llama.cpp)."""
    import llama_cpp.llama_cpp as ll

    try:
        fn = getattr(ll._lib, name)
    except AttributeError:
        return None
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


def engine_patches() -> List[str]:
    """Names of the patches the loaded llama library was built with (``llama_molink_patches()``); [] if none."""
    import ctypes

    fn = llama_patch_function("llama_molink_patches", ctypes.c_char_p, [])
    if fn is None:
        return []
    return [s for s in (fn() or b"").decode("ascii", "replace").split(",") if s]


def preload_cuda_runtime() -> List[str]:
    """Make NVIDIA's registry wheels (``nvidia-cuda-runtime-cu12``, ``nvidia-cublas-cu12``) serve as the CUDA
    runtime of a CUDA llama.cpp build; call before llama_cpp is imported. Returns what it loaded or added.

    The project's CUDA wheels (kernels/wheel.py) do not bundle the runtime: they depend on those wheels.
    On Linux the libraries are loaded with ``RTLD_GLOBAL``, so the loader resolves llama.cpp's CUDA
    library against them by soname; on Windows their ``bin`` folders join the DLL search path.
    Nothing happens where the wheels are not installed (CPU builds, or a CUDA toolkit on the system).
    """
    import ctypes
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    done: List[str] = []
    for root in roots:
        # CUDA 12 wheels: nvidia/cuda_runtime/lib, nvidia/cublas/lib; CUDA 13 wheels: nvidia/cu13/lib
        if sys.platform == "win32":
            for d in sorted({p.parent for p in root.glob("*/bin/*.dll") if p.name.startswith(("cudart", "cublas"))}):
                os.add_dll_directory(str(d))
                done.append(str(d))
            continue
        for name in ("cudart", "cublasLt", "cublas"):
            for lib in sorted(root.glob(f"*/lib/lib{name}.so.*")):
                try:
                    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                    done.append(str(lib))
                except OSError:
                    pass
                break
    PRELOADED[:] = done
    return done


PRELOADED: List[str] = []  # what preload_cuda_runtime() loaded (doctor reports it)
