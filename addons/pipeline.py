"""One mitmproxy addon that runs several in turn."""

import inspect
import logging

import mitmproxy.addons  # noqa: F401  (with what it imports, defines every hook: all_hooks is whole)
from mitmproxy import exceptions, hooks

log = logging.getLogger(__name__)
SIGNALS = (exceptions.AddonHalt, exceptions.OptionsError)  # mitmproxy's, passed on as its safecall does

# A script's (re)load calls load, configure and running, and its unload calls done, with
# mitmproxy's invoke_addon_sync; that refuses coroutine functions, but not a pipeline that makes one.
SYNCHRONOUS = frozenset({"load", "configure", "running", "done"})


class Pipeline:
    """The gateway's concerns as one mitmproxy addon: every event calls their hooks in order,
    the events of a flow as well as `load`, `configure`, `running` and `done`.

    Each concern is an addon in mitmproxy's own style (options declared in `load`, hooks named
    for events), tested alone in `taddons` contexts. Loaded as mitmproxy's children, each of
    their hooks costs a few microseconds of mitmproxy's dispatch on top of its own work (finding
    it, building its arguments, awaiting it), some twenty times a call: called from here instead,
    meterproxy serves about 5% more requests per second (paired runs of `scripts/bench.py`'s load).
    As in mitmproxy, a hook may return an awaitable, and the next concern's hook waits for it;
    an exception in one hook is logged and the next concern's hook still runs (the ledger
    completes a call whatever an earlier concern did), but for mitmproxy's own signals
    (`OptionsError` refuses an option, `AddonHalt` stops the event). The events that
    mitmproxy may call without awaiting (`SYNCHRONOUS`) must not wait: otherwise, on a script's
    reload, the concerns after the one that waits would never see them.
    """

    def __init__(self, *concerns) -> None:
        for event in hooks.all_hooks:
            chain = tuple(hook for concern in concerns if callable(hook := getattr(concern, event, None)))
            if event in SYNCHRONOUS and (waiting := [hook for hook in chain if inspect.iscoroutinefunction(hook)]):
                raise TypeError(f"{waiting[0].__qualname__}: mitmproxy may call {event} without awaiting it")
            if chain:
                setattr(self, event, _in_turn(chain))


def _in_turn(chain: tuple):
    """Call `chain`'s hooks one after the other, synchronously until one returns an awaitable;
    the rest then run after it, in a coroutine mitmproxy awaits."""

    def run(*args):
        for position, hook in enumerate(chain):
            pending = _call(hook, args)
            if pending is not None and inspect.isawaitable(pending):
                return _after(pending, hook, chain[position + 1 :], args)
        return None

    return run


async def _after(pending, waited_for, chain: tuple, args: tuple) -> None:
    await _wait(pending, waited_for)
    for hook in chain:
        pending = _call(hook, args)
        if pending is not None and inspect.isawaitable(pending):
            await _wait(pending, hook)


def _call(hook, args: tuple):
    try:
        return hook(*args)
    except SIGNALS:
        raise
    except Exception:
        log.exception("addon error in %s", hook.__qualname__)
        return None


async def _wait(pending, hook) -> None:
    try:
        await pending
    except SIGNALS:
        raise
    except Exception:
        log.exception("addon error in %s", hook.__qualname__)
