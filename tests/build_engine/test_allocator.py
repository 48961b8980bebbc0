"""The server's allocator setting: what each value chooses, where it looks, how LD_PRELOAD is composed."""

from __future__ import annotations

from pathlib import Path

import pytest

from build_engine.allocator import JEMALLOC_CONF, Allocator, AllocatorNotFoundError, choose_allocator


def library_dir(root: Path, *names: str) -> Path:
    """A directory holding (empty) files with these library names; the choice only looks for the file."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"")
    return root


def test_auto_prefers_jemalloc_then_tcmalloc_then_glibc(tmp_path: Path) -> None:
    both = library_dir(tmp_path / "both", "libtcmalloc_minimal.so.4", "libjemalloc.so.2")
    tc_only = library_dir(tmp_path / "tc", "libtcmalloc.so.4")
    empty = library_dir(tmp_path / "empty")

    chosen = choose_allocator("auto", dirs=[empty, both])
    assert (chosen.name, chosen.library) == ("jemalloc", both / "libjemalloc.so.2")
    chosen = choose_allocator("auto", dirs=[empty, tc_only])
    assert (chosen.name, chosen.library) == ("tcmalloc", tc_only / "libtcmalloc.so.4")
    chosen = choose_allocator("auto", dirs=[empty])
    assert (chosen.name, chosen.library) == ("glibc", None)
    assert chosen.describe() == f"malloc glibc (auto: neither jemalloc nor tcmalloc is installed in {empty})"


def test_named_allocator_must_be_installed(tmp_path: Path) -> None:
    empty = library_dir(tmp_path / "empty")
    with pytest.raises(AllocatorNotFoundError) as info:
        choose_allocator("jemalloc", dirs=[empty])
    assert str(info.value) == (
        f"--malloc / GLMV_TRITON_MALLOC: jemalloc asked for, but no libjemalloc.so.2 or libjemalloc.so in "
        f"{empty} (install libjemalloc2 / libtcmalloc-minimal4, or use auto or glibc)"
    )
    with pytest.raises(AllocatorNotFoundError, match="is not a file"):
        choose_allocator(str(empty / "libjemalloc.so.2"))
    with pytest.raises(AllocatorNotFoundError, match="'mimalloc' is not auto, jemalloc, tcmalloc, glibc"):
        choose_allocator("mimalloc")
    assert choose_allocator("glibc", dirs=[library_dir(tmp_path / "je", "libjemalloc.so.2")]).library is None


def test_setting_defaults_to_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = library_dir(tmp_path / "lib", "libjemalloc.so.2")
    monkeypatch.setenv("GLMV_TRITON_MALLOC", "glibc")
    assert choose_allocator(dirs=[lib]).name == "glibc"
    monkeypatch.delenv("GLMV_TRITON_MALLOC")
    assert choose_allocator(dirs=[lib]).name == "jemalloc"
    assert choose_allocator(str(lib / "libjemalloc.so.2")).name == "jemalloc"


def test_preload_goes_first_and_keeps_the_callers_settings() -> None:
    je = Allocator("jemalloc", Path("/usr/lib/libjemalloc.so.2"), "test")
    assert je.environment({"PATH": "/bin"}) == {
        "PATH": "/bin",
        "LD_PRELOAD": "/usr/lib/libjemalloc.so.2",
        "MALLOC_CONF": JEMALLOC_CONF,
    }
    assert je.environment({"MALLOC_CONF": "narenas:4"})["MALLOC_CONF"] == "narenas:4"
    assert je.environment({"LD_PRELOAD": "/opt/a.so /opt/b.so"})["LD_PRELOAD"] == (
        "/usr/lib/libjemalloc.so.2:/opt/a.so:/opt/b.so"
    )
    assert je.environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})["LD_PRELOAD"] == (
        "/usr/lib/libjemalloc.so.2"
    )
    tc = Allocator("tcmalloc", Path("/usr/lib/libtcmalloc_minimal.so.4"), "test")
    assert "MALLOC_CONF" not in tc.environment({})
    glibc = Allocator("glibc", None, "test")
    assert glibc.environment({"LD_PRELOAD": "/opt/a.so"}) == {"LD_PRELOAD": "/opt/a.so"}
