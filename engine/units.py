"""Display units. GiB = 2**30 bytes and GB = 10**9 bytes are different: every label says which."""

GiB = 2**30
MiB = 2**20
GB = 10**9


def gib(n: int) -> float:
    return n / GiB


def fmt_bytes(n: int, unit: str = "GiB", digits: int = 2) -> str:
    """
    >>> fmt_bytes(3 * 2**30)
    '3.00 GiB'
    >>> fmt_bytes(3 * 10**9, "GB")
    '3.00 GB'
    """
    div = {"GiB": GiB, "MiB": MiB, "GB": GB, "MB": 10**6}[unit]
    return f"{n / div:.{digits}f} {unit}"
