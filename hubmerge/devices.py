"""Where NER and OLM compute: `--device` and the config's `device`, checked before any work.

A device that torch does not know (`banana`) or that this machine lacks (`cuda` without a GPU,
`cuda:3` with one) is refused at once with one line naming the option, instead of failing
after the models were opened and an output folder was made.
"""

from __future__ import annotations

from hubmerge.errors import ConfigError

#: Let accelerate spread a model over the GPUs and CPU memory (OLM; see `methods.olm`).
AUTO = "auto"


def check_device(device: str, *, allow_auto: bool = True, key: str = "--device") -> str:
    """`device` if torch can compute there (or `auto`, where allowed), else a `ConfigError`
    naming `key`, the option or config key it came from.
    """
    if allow_auto and device == AUTO:
        return device
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{key} {device}: not a torch device (cpu, cuda, cuda:1)") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} {device}: CUDA is not available to torch here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{key} {device}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
        return device
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ConfigError(f"{key} {device}: {parsed.type} is not available to torch here")
    return device
