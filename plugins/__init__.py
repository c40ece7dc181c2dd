"""grnx's built-in plugins, one sub-package per component kind.

This folder is installed as ``grnx_plugins``. Importing it as a top-level ``plugins`` package (from
the repository root) would load every module twice under two names, so it is refused.
"""

if __name__ != "grnx_plugins":
    raise ImportError(
        "The built-in plugins are the package 'grnx_plugins'; import them as grnx_plugins, not "
        f"{__name__!r}. Install grnx with `pip install -e .`."
    )
