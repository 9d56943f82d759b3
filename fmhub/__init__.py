"""fmhub: foundation models engineered like software, in plain git repositories."""

__version__ = "0.1.0"


def hookimpl(function=None, *, hookwrapper=False, optionalhook=False, tryfirst=False, trylast=False, specname=None, wrapper=False):
    """Marker for plugin hook implementations: ``@fmhub.hookimpl``.

    What ``pluggy.HookimplMarker("fmhub")`` does (it sets ``fmhub_impl`` on the
    function, which pluggy reads when the plugin is registered), without
    importing pluggy: git starts fmhub's filter for every git command, and most
    of them only need built-in plugins (`fmhub.plugin.host` then calls them directly).
    """

    def mark(func):
        func.fmhub_impl = {"wrapper": wrapper, "hookwrapper": hookwrapper, "optionalhook": optionalhook,
                           "tryfirst": tryfirst, "trylast": trylast, "specname": specname}
        return func

    return mark if function is None else mark(function)
