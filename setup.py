"""Build the compiled kernels (freezepack/format/_philox.c, _ans.c) when the package is installed.

They are plain C shared libraries loaded with ctypes (no Python C API), so any wheel tag works; they are built as
optional extensions: where no compiler exists, the install still succeeds and freezepack compiles them on first
use into a per-user cache, or, without any compiler, warns once and uses its bit-exact pure-torch path.
Everything else about the package is in pyproject.toml.
"""
import hashlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Same rules as freezepack/format/native.py: no FMA contraction, IEEE float32 semantics (no -ffast-math).
UNIX_FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-pthread"]


class BuildKernels(build_ext):
    def build_extension(self, ext):
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/O2", "/fp:strict"]
        else:
            ext.extra_compile_args, ext.extra_link_args = UNIX_FLAGS, ["-pthread"]
        super().build_extension(ext)

    def get_export_symbols(self, ext):  # a ctypes library has no PyInit_ function to export
        return ext.export_symbols


def kernel(name: str) -> Extension:
    src = f"freezepack/format/_{name}.c"
    with open(src, "rb") as f:  # the loader uses the library only while it matches the installed source
        sha = hashlib.sha256(f.read()).hexdigest()
    return Extension(f"freezepack.format._{name}_lib", [src], optional=True,
                     define_macros=[("FP_SOURCE_SHA256", f'"{sha}"')])


setup(
    ext_modules=[kernel("philox"), kernel("ans")],
    cmdclass={"build_ext": BuildKernels},
)
