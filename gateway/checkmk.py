"""The check_mk local-check format: a service's state, name, text and metrics, one line each."""

from __future__ import annotations

from dataclasses import dataclass, field

OK, WARN, CRIT, UNKNOWN = 0, 1, 2, 3


@dataclass(frozen=True)
class Metric:
    """One check_mk metric: name=value;warn;crit."""

    name: str
    value: float
    warn: float | None = None
    crit: float | None = None

    def render(self) -> str:
        def num(v: float | None) -> str:
            return "" if v is None else (str(int(v)) if float(v).is_integer() else f"{v:.2f}")

        text = f"{self.name}={num(self.value)}"
        if self.warn is not None or self.crit is not None:
            text += f";{num(self.warn)};{num(self.crit)}"
        return text


@dataclass(frozen=True)
class Service:
    """One line of the local check."""

    state: int
    name: str
    text: str
    metrics: tuple[Metric, ...] = field(default_factory=tuple)

    def render(self) -> str:
        metrics = "|".join(m.render() for m in self.metrics) or "-"
        text = self.text.replace("\n", " ").replace('"', "'")
        return f'{self.state} "{self.name}" {metrics} {text}'
