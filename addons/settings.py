"""Settings that cannot take effect stop the gateway at start (an operator's typo in the
passthrough policy must not leave a relay open).

mitmproxy keeps a `--set` whose name no addon has registered in `options.deferred`, silently, and
a value its type rejects makes the script fail to load, also silently: on 12.3.1 the gateway then
started without its addons. This concern comes last in the pipeline's `load`, when every
`meterproxy_*` option is registered, and applies the deferred ones itself: an unknown name or a
value that does not parse is one error line naming the option and what it accepts, and
mitmproxy's start-up check then exits.
"""

import logging
import typing
from difflib import get_close_matches

from mitmproxy import ctx, exceptions

PREFIX = "meterproxy_"
log = logging.getLogger("meterproxy")


class Settings:
    def load(self, loader):
        options = ctx.options
        for name in [name for name in options.deferred if name.startswith(PREFIX)]:
            value = options.deferred.pop(name)
            if name not in options:
                log.error("%s", unknown(name, [known for known in options.keys() if known.startswith(PREFIX)]))
                continue
            option = options._options[name]  # mitmproxy's record of the option: its type and choices
            texts = getattr(value, "val", None)  # as given on the command line; None: already typed
            try:
                if texts is None:
                    options.update(**{name: value})
                elif option.choices and any(text not in option.choices for text in texts):
                    raise exceptions.OptionsError(f"{' '.join(texts)!r} is not one of its choices")
                else:
                    options.set(*(f"{name}={text}" for text in texts))
            except exceptions.OptionsError as error:
                log.error("--set %s: %s; it takes %s", name, error, accepts(option))


def unknown(name: str, known: list[str]) -> str:
    close = get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"--set {name}: no such meterproxy option{hint}; the options are {', '.join(sorted(known))}"


def accepts(option) -> str:
    """What an option takes, in words."""
    if option.choices:
        return "one of " + ", ".join(option.choices)
    kinds = {int: "a whole number", bool: "true or false", str: "text"}
    typespec = option.typespec
    if typing.get_origin(typespec) is typing.Union:
        typespec = next(arg for arg in typing.get_args(typespec) if arg is not type(None))
    return kinds.get(typespec, str(typespec))
