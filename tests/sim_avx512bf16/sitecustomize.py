"""Put on PYTHONPATH to make bitsandbytes' CPU backend believe, while it imports, that this CPU has AVX512-BF16: it
then asks the `kernels` package for its Hub kernel, as it does on such CPUs (tests/test_own_output.py). Only the
import sees the answer; nothing that would run AVX512 instructions is called."""

import importlib.abc
import importlib.util
import sys

TARGET = "bitsandbytes.backends.cpu.ops"


class _SimulateAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        import bitsandbytes.functional as functional

        spec = importlib.util.find_spec(name)
        loader = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                real = functional.has_avx512bf16
                functional.has_avx512bf16 = lambda: True
                try:
                    loader.exec_module(module)
                finally:
                    functional.has_avx512bf16 = real

        spec.loader = _Loader()
        return spec


sys.meta_path.insert(0, _SimulateAvx512Bf16())
