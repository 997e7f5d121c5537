"""Sparsity patterns: what fraction of a linear layer to prune, and in which shape.

A pattern is either unstructured (a fraction of the weights of every output row) or N:M
semi-structured (keep N of every M consecutive input weights, e.g. 2:4 for sparse tensor cores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from losa.errors import ConfigError


@dataclass(frozen=True)
class Pattern:
    """What to prune in one linear layer.

    sparsity: fraction of weights pruned, in [0, 1); for N:M it is 1 - n/m.
    n, m: N:M pattern, keep n of every m consecutive input weights; m == 0 means unstructured.
    """

    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m == 0:
            if self.n != 0:
                raise ConfigError(f"N:M pattern with N={self.n} but M=0; give both, e.g. 2:4")
            s = self.sparsity
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= s < 1.0):
                raise ConfigError(
                    f"sparsity must be a fraction in [0, 1), got {s!r}; e.g. 0.5 prunes half the weights"
                )
            object.__setattr__(self, "sparsity", float(s))
            return
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not (0 < self.n < self.m):
            raise ConfigError(
                f"N must be < M and both positive in an N:M pattern, got {self.n}:{self.m}; "
                "e.g. 2:4 keeps 2 of every 4 weights"
            )
        implied = 1.0 - self.n / self.m
        if self.sparsity not in (0.0, implied) and not math.isclose(self.sparsity, implied):
            raise ConfigError(
                f"pattern {self.n}:{self.m} prunes {implied:g} of the weights, not {self.sparsity:g}; "
                "give either the N:M pattern or the sparsity, not both"
            )
        object.__setattr__(self, "sparsity", implied)

    @classmethod
    def unstructured(cls, sparsity: float) -> "Pattern":
        """Prune the fraction `sparsity` (0 <= sparsity < 1) of every output row."""
        return cls(sparsity=sparsity)

    @classmethod
    def nm(cls, n: int, m: int) -> "Pattern":
        """Keep `n` of every `m` consecutive input weights (0 < n < m)."""
        return cls(n=n, m=m)

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """Parse "0.5" (unstructured) or "2:4" (N:M)."""
        raw = str(text).strip()
        hint = "give a fraction in [0, 1) such as 0.5, or an N:M pattern such as 2:4"
        if ":" in raw:
            parts = raw.split(":")
            try:
                if len(parts) != 2:
                    raise ValueError
                n, m = (int(p.strip()) for p in parts)
            except ValueError:
                raise ConfigError(f"cannot read sparsity pattern {text!r}; {hint}") from None
            return cls.nm(n, m)
        try:
            sparsity = float(raw)
        except ValueError:
            raise ConfigError(f"cannot read sparsity pattern {text!r}; {hint}") from None
        return cls.unstructured(sparsity)

    @property
    def is_nm(self) -> bool:
        """True for an N:M pattern."""
        return self.m > 0

    def check_width(self, in_features: int) -> None:
        """Raise ConfigError if an N:M group does not tile a layer with `in_features` inputs."""
        if self.is_nm and in_features % self.m != 0:
            raise ConfigError(
                f"N:M pattern {self} needs the layer's input width to be a multiple of M={self.m}, "
                f"but in_features={in_features}; use an N:M pattern whose M divides {in_features} "
                "or unstructured sparsity for this model"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else str(self.sparsity)
