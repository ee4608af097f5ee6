"""Coordination of the processes of one `accelerate launch` (or of a single process).

Phase 1 builds and the training loop run under several processes: some steps belong to the main
process (writing a manifest), and an error on any process must reach all of them, or the others
wait at the next barrier forever. These two helpers are the whole protocol.
"""

from __future__ import annotations

from collections.abc import Callable

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from adaspec.errors import UserError
from cache_tools.errors import CacheError

USER_ERRORS = (UserError, CacheError)


def on_main(state: PartialState, fn: Callable[[], object]) -> object:
    """Run fn on the main process and hand its result (or its user error) to every process."""
    payload: list[object] = [None]
    if state.is_main_process:
        try:
            payload = [("ok", fn())]
        except USER_ERRORS as err:
            payload = [("error", err)]
    if state.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    status, value = payload[0]  # type: ignore[misc]
    if status == "error":
        raise value  # type: ignore[misc]
    return value


def raise_if_any(state: PartialState, error: BaseException | None) -> None:
    """Raise on every process if any process failed (so nobody waits at a barrier forever)."""
    errors = (
        gather_object([str(error) if error else None])
        if state.num_processes > 1
        else [str(error) if error else None]
    )
    first = next((e for e in errors if e), None)
    if first:
        if error is not None:
            raise error
        raise CacheError(first)


def together(state: PartialState, fn: Callable[[], object]) -> None:
    """Run fn on every process; a user error on any process is raised on all of them."""
    error: BaseException | None = None
    try:
        fn()
    except USER_ERRORS as err:
        error = err
    raise_if_any(state, error)
