"""Opt-in: JAX's persistent compilation cache, so a second run of a script skips XLA.

Off by default, because it is a process-wide JAX setting that writes to disk: a library
should not change either behind its user's back (the user may have set their own cache
directory, run on a read-only or shared file system, or run many processes at once).
One call at the top of a script turns it on.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["enable_compilation_cache"]


def enable_compilation_cache(directory: str | os.PathLike | None = None,
                             min_compile_seconds: float = 1.0) -> Path:  # fmt: skip
    """Turn on JAX's persistent compilation cache; returns the directory used.

    Every XLA compilation that took at least ``min_compile_seconds`` is written to
    ``directory`` (default: ``$XDG_CACHE_HOME/invnet/jax``, else ``~/.cache/invnet/jax``),
    and a later process compiling the same program on the same JAX version and machine
    reads it back instead of compiling: `invnet.fit`'s first step, ``log_prob``,
    `invnet.freeze`'s functions alike. The cache never changes results; it only skips
    work. Delete the directory to clear it. This sets ``jax_compilation_cache_dir`` and
    ``jax_persistent_cache_min_compile_time_secs`` for the whole process.

    Example:
        >>> import tempfile, jax, invnet
        >>> before = jax.config.jax_compilation_cache_dir
        >>> path = invnet.enable_compilation_cache(tempfile.mkdtemp())
        >>> jax.config.jax_compilation_cache_dir == str(path)
        True
        >>> jax.config.update("jax_compilation_cache_dir", before)  # as it was
    """
    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        directory = Path(base) / "invnet" / "jax"
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return path
