"""Fine-tuning methods, one file each, behind one interface (``glmtune.methods.base.Method``)."""

from glmtune.methods.base import Method
from glmtune.methods.freeze import FreezeMethod
from glmtune.methods.full import FullMethod
from glmtune.methods.lora import LoraMethod
from glmtune.methods.ptuning import PTuningMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (LoraMethod, PTuningMethod, FreezeMethod, FullMethod)}


def get_method(name: str) -> Method:
    return METHODS[name]()


__all__ = ["METHODS", "Method", "get_method"]
