"""DINO collapse alarm: is the teacher's target still about the image?

The DINO paper (Sec. 5.3, Fig. 7) tells the two collapse modes apart by two entropies of the
centred, sharpened teacher target ``P(k | x)``: the mean per-image entropy ``H(P(.|x))`` and the
entropy of the batch-mean target ``H(E_x P(.|x))``. Both near ``ln K`` is the uniform collapse,
both near 0 the one-dimension collapse (in between: the same few prototypes for every image; on
digits at T 0.01 with centring alone, about 3.4 of 1024). In every case their difference

    info = H(E_x P(.|x)) - E_x H(P(.|x))        (the mutual information I(x; k) over the batch)

is near zero: the target no longer depends on the image, so the student learns nothing about it.
A healthy run keeps ``info`` well above zero (about 1-1.6 nats in the CPU quickstart, at most
``ln(batch)``). The monitor watches ``info`` every step and raises the alarm when it stays below
``min_info`` for ``window`` consecutive steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: What to try. First the remedy of the low-information screen (README, "A remedy for
#: low-information images"): on upscaled digits DINOv2's pair alone only delayed the collapse
#: over the 48-epoch recipe (step 472 instead of 134); with a teacher at T 0.01 the target
#: stayed informative and the run learned in 5 of 5 seeds. Then the levers of the
#: recipe screens.
ADVICE = (
    "DINOv2's pair with a sharper teacher, dino.koleo_weight=0.1 dino.centering=sinkhorn_knopp "
    "dino.teacher_temp=0.01 dino.warmup_teacher_temp=0.01 (on low-variety images such as "
    "upscaled digits it kept the target informative in 5 of 5 seeds; at T 0.02 the alarm fired "
    "in 1 of 5), a lower optim.lr, a smaller dino.out_dim, or a larger batch; see README 'A remedy "
    "for low-information images'"
)


class CollapseError(RuntimeError):
    """Raised under ``run.on_collapse=stop``."""


def target_information(per_image_entropy: float, batch_entropy: float) -> float:
    """Nats that the teacher target carries about the image (see the module docstring)."""
    return float(batch_entropy) - float(per_image_entropy)


def collapse_mode(per_image_entropy: float, n_prototypes: int) -> str:
    """Which of DINO's collapse modes the (image-independent) target is in, from its entropy
    against ``ln K``: uniform over the K prototypes (above half of ``ln K``), on one prototype
    (under 1.5 effective prototypes), or the same few prototypes for every image in between
    (``exp(entropy)`` of them)."""
    effective = math.exp(per_image_entropy)
    if per_image_entropy > 0.5 * math.log(n_prototypes):
        return f"uniform collapse, ~{effective:.0f} of {n_prototypes} prototypes"
    if effective < 1.5:
        return "one-dimension collapse"
    return f"collapse onto ~{effective:.1f} of {n_prototypes} prototypes, the same for every image"


@dataclass
class CollapseMonitor:
    """Streak counter over steps; ``state_dict`` goes into the checkpoint (exact resume)."""

    window: int = 100
    min_info: float = 0.05
    streak: int = 0  # consecutive steps below min_info, ending at the last update
    streak_start: int = -1  # first step of the current streak
    collapsed_at: int = -1  # step at which the alarm first fired (-1: never)
    collapsed_steps: int = 0  # steps spent in an alarmed streak, over the whole run

    def update(self, step: int, per_image_entropy: float, batch_entropy: float) -> bool:
        """Record one step; True exactly when the alarm fires (the streak reaches ``window``)."""
        info = target_information(per_image_entropy, batch_entropy)
        if info != info or info >= self.min_info:  # NaN (skipped step) breaks no streak
            if info == info:
                self.streak, self.streak_start = 0, -1
            return False
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        if self.streak >= self.window:
            self.collapsed_steps += 1
        if self.streak == self.window:
            if self.collapsed_at < 0:
                self.collapsed_at = step
            return True
        return False

    @property
    def collapsed(self) -> bool:
        """The target is uninformative now (the current streak has reached the window)."""
        return self.window > 0 and self.streak >= self.window

    def message(
        self, step: int, per_image_entropy: float, batch_entropy: float, n_prototypes: int
    ) -> str:
        info = target_information(per_image_entropy, batch_entropy)
        return (
            f"DINO COLLAPSE at step {step}: for {self.streak} steps (since step "
            f"{self.streak_start}) the teacher target carried {info:.3f} nats about the image "
            f"(< run.collapse_min_info={self.min_info}; teacher entropy {per_image_entropy:.3f}, "
            f"batch-mean entropy {batch_entropy:.3f}: "
            f"{collapse_mode(per_image_entropy, n_prototypes)}). The student is learning "
            f"nothing about the images. Try {ADVICE}."
        )

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k in ("streak", "streak_start", "collapsed_at", "collapsed_steps"):
            setattr(self, k, int(state.get(k, getattr(self, k))))

    def summary(self) -> dict:
        return {
            "collapsed": self.collapsed_at >= 0,
            "collapsed_at_step": self.collapsed_at if self.collapsed_at >= 0 else None,
            "collapsed_steps": self.collapsed_steps,
            "collapsed_at_end": self.collapsed,
            "window": self.window,
            "min_info": self.min_info,
        }
