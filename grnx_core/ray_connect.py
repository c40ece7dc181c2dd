"""Starting Ray, or joining an existing cluster, with a clear error when the cluster refuses us."""

from __future__ import annotations

from typing import Any

from grnx_core.errors import GrnxError


def init_ray(address: str | None, num_cpus: int | None, **options: Any) -> None:
    """``ray.init`` on the cluster at ``address``, or a local Ray with ``num_cpus`` when None.

    A cluster that cannot be reached or refuses the connection is a GrnxError naming the address
    and what to check, instead of Ray's traceback.
    """
    import ray

    if not address:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **options)
        return
    try:
        ray.init(address=address, **options)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError, ... depending on the cause
        text = f"{type(error).__name__}: {error}"
        hint = (
            "The head uses token authentication (Ray 2.60's default): set RAY_AUTH_MODE=token, and "
            "RAY_AUTH_TOKEN to the cluster's token, in grnx's environment."
            if "auth" in text.lower() or "token" in text.lower()
            else "Check that the head runs (`ray status --address ADDRESS`), that the address and port "
            "are right (ray://HOST:10001 for Ray Client, HOST:6379 on the cluster's network), and that "
            "grnx and its Ray version are installed on every node."
        )
        raise GrnxError(f"could not connect to the Ray cluster at {address!r}: {text}. {hint}") from None
