"""What a model must not do under ``torch.func``, said in one line instead of the transforms' internal text.

A user's model meets three transforms at once: ``functional_call`` (weights
passed in), ``grad`` (inner loop, twice differentiated at second order) and
``vmap`` (tasks batched). Most models pass through unchanged; the few things
that cannot work fail deep inside PyTorch with a message about its internals.
:func:`explain_model_error` recognizes those failures, finds the innermost
module of the model that was running (from the traceback), and raises
:class:`UnsupportedModelError` naming the module, what it did, and the way out.
"""

from __future__ import annotations

from types import TracebackType

from torch import nn

__all__ = ["UnsupportedModelError", "explain_model_error", "is_out_of_memory"]


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: ``MemoryError``, ``torch.OutOfMemoryError`` or the CPU allocator's."""
    text = str(err)
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text))


class UnsupportedModelError(ValueError):
    """A model does something that cannot run under the library's transforms; the message says what and the fix."""


# (text torch raises, what the model did, the way out); the first match wins.
_KNOWN: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("mutate a captured Tensor", "mutate a captured tensor"),
     "writes in place to a tensor it did not receive as a buffer (a parameter, or a tensor attribute that is "
     "not registered)",
     "register that tensor with self.register_buffer(...) so each task gets its own copy, or compute it "
     "out of place"),
    (("inplace arithmetic", "in-place operation", "is not possible because there exists a Tensor"),
     "writes a per-task value in place into a tensor shared by every task (a tensor attribute that is not a "
     "registered buffer)",
     "register that tensor with self.register_buffer(...), or run the tasks in a loop (way=LOOP; --execution loop)"),
    (("data-dependent control flow", "calling .item()", ".item() on a Tensor", "Data dependent"),
     "branches in Python on a tensor's value (if/while on a tensor, .item(), bool(tensor)), which vmap cannot "
     "batch",
     "rewrite the branch with torch.where, or run the tasks in a loop (way=LOOP; --execution loop)"),
    (("random operation while in randomness error mode",),
     "draws random numbers (Dropout, DropBlock, torch.rand), and this algorithm recomputes the forward in its "
     "backward, where the draws would differ",
     "use backprop='unroll', or turn the random layers off (p=0)"),
    (("derivative for",),
     "uses an operation without the double backward that a second-order meta-gradient needs",
     "use first_order=True (first-order MAML), or replace the operation"),
    (("Batching rule not implemented", "doesn't work on out= or view ops", "vmap: We do not yet support"),
     "uses an operation that vmap cannot batch",
     "run the tasks in a loop (way=LOOP; --execution loop)"),
)


def _innermost_module(model: nn.Module, tb: TracebackType | None) -> str | None:
    """The name (in ``model``) of the innermost module of ``model`` whose ``forward`` is in the traceback."""
    names = {id(m): name for name, m in model.named_modules()}
    found = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def explain_model_error(caller: str, model: nn.Module, err: BaseException, *, vectorized: bool = True) -> None:
    """Raise :class:`UnsupportedModelError` (one line, from ``None``) if ``err`` is a known limit of the transforms.

    Returns without raising for any other error, which then propagates as it is.

    Args:
        caller: the algorithm's name, which starts the message.
        model: the network that was running.
        err: what was raised while running it.
        vectorized: whether the tasks ran under ``vmap`` (the loop has no
            batching limits, so those hints are left out).
    """
    text = str(err)
    for needles, did, fix in _KNOWN:
        if any(n in text for n in needles):
            if not vectorized and fix.endswith("(way=LOOP; --execution loop)") and "register" not in fix:
                return  # a batching limit cannot be what failed in the loop
            name = _innermost_module(model, err.__traceback__)
            where = f"module {name!r} ({type(model.get_submodule(name)).__name__})" if name else \
                f"the model ({type(model).__name__})"
            op = text.split("\n")[0][:120]
            raise UnsupportedModelError(f"{caller}: {where} {did} [{op}]; {fix}") from None
