"""How random a plan's steps are: class and length mix per step, measured against random steps of the same sizes.

With ``loss_normalization: weight_sum`` the reward weights only matter *relative to the other classes in the same
step*: in a step holding one class, sub-optimal data moves the model as much as expert data. So a planner must not
group conversations by anything that correlates with class (length does). These figures show it on real data.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import exp, lgamma

import numpy as np

from crlft.packing import EpochPlan, stream_order


def _step_of_conversations(plan: EpochPlan) -> np.ndarray:
    """Step of each entry of ``plan.conversation_indices``."""
    return np.repeat(np.arange(plan.num_steps), np.diff(plan.step_offsets))


def _all_from_one_class(class_size: int, total: int, drawn: int) -> float:
    """Probability that ``drawn`` conversations drawn at random without replacement are all of one class."""
    if drawn > class_size:
        return 0.0
    log_p = lgamma(class_size + 1) - lgamma(class_size - drawn + 1) - lgamma(total + 1) + lgamma(total - drawn + 1)
    return exp(log_p)


@dataclass(frozen=True)
class StepMixing:
    """Steps that hold a single class, in a plan and in random steps of the same sizes.

    Attributes:
        num_steps: steps measured: all but the last (it holds the epoch's left-overs), or the only one.
        num_classes: distinct classes in the epoch.
        one_class_share: share of the measured steps whose conversations are all of one class.
        random_one_class_share: the expected share if every step were a random draw of as many conversations
            (exact, without replacement).
    """

    num_steps: int
    num_classes: int
    one_class_share: float
    random_one_class_share: float

    @property
    def is_far_from_random(self) -> bool:
        """More one-class steps than random steps would give by a clear margin (2x and 2 points)."""
        return self.one_class_share > max(2 * self.random_one_class_share, self.random_one_class_share + 0.02)


def one_class_steps(plan: EpochPlan, class_of_conversation: np.ndarray) -> StepMixing:
    """Measures how many steps of ``plan`` hold one class only.

    Args:
        plan: an epoch plan.
        class_of_conversation: integer class code of every dataset row (e.g. the condition's code).

    Returns:
        A :class:`StepMixing`.
    """
    codes = np.asarray(class_of_conversation)
    class_sizes = np.unique(codes, return_counts=True)[1]
    if plan.num_steps == 0:
        return StepMixing(0, len(class_sizes), 0.0, 0.0)
    measured = max(plan.num_steps - 1, 1)
    starts, sizes = plan.step_offsets[:measured], np.diff(plan.step_offsets)[:measured]
    planned = codes[plan.conversation_indices[: plan.step_offsets[measured]]]  # the measured steps only
    one_class = np.zeros(measured, bool)
    nonempty = sizes > 0  # only a lone last step can be empty
    if nonempty.any():
        lowest = np.minimum.reduceat(planned, starts[nonempty])
        highest = np.maximum.reduceat(planned, starts[nonempty])
        one_class[nonempty] = lowest == highest
    # Steps of equal size have the same chance; there are far fewer sizes than steps.
    step_sizes, num_steps_of_size = np.unique(sizes, return_counts=True)
    chance = [sum(_all_from_one_class(int(c), len(codes), int(k)) for c in class_sizes) for k in step_sizes]
    random_share = float(np.dot(chance, num_steps_of_size) / measured)
    return StepMixing(measured, len(class_sizes), float(one_class.mean()), random_share)


@dataclass(frozen=True)
class MixingComparison:
    """A plan's step composition beside random chunks of the stream with the same conversations per step.

    Figures cover all steps but the last; ``random_*`` figures are means over ``num_random_draws`` shuffles.

    Attributes:
        no_expert_share: share of steps without an expert conversation.
        expert_share_std: standard deviation across steps of the expert share of a step's conversations.
        mean_length_std: standard deviation across steps of a step's mean conversation length (tokens).
        random_no_expert_share, random_expert_share_std, random_mean_length_std: the same for random chunks.
        max_displacement_steps: the largest distance, in steps, between where a conversation is trained and
            where its stream position falls when the steps are cut from the stream in order with the same sizes.
        mean_displacement_steps: the mean of that distance.
        num_random_draws: shuffles the random figures average over.
    """

    no_expert_share: float
    expert_share_std: float
    mean_length_std: float
    random_no_expert_share: float
    random_expert_share_std: float
    random_mean_length_std: float
    max_displacement_steps: int
    mean_displacement_steps: float
    num_random_draws: int


def _composition(steps: np.ndarray, sizes: np.ndarray, is_expert: np.ndarray, lengths: np.ndarray, measured: int):
    experts = np.bincount(steps, weights=is_expert, minlength=len(sizes))[:measured]
    tokens = np.bincount(steps, weights=lengths, minlength=len(sizes))[:measured]
    counts = np.maximum(sizes[:measured], 1)
    return float(np.mean(experts == 0)), float(np.std(experts / counts)), float(np.std(tokens / counts))


def compare_with_random(
    plan: EpochPlan, lengths: np.ndarray, is_expert: np.ndarray, seed: int, epoch: int, num_random_draws: int = 8
) -> MixingComparison:
    """Compares the composition of ``plan``'s steps with random chunks of the same sizes (see the class).

    Args:
        plan: the plan of ``epoch`` made by :func:`crlft.packing.plan_epoch` with ``seed``.
        lengths: the lengths it was made from.
        is_expert: boolean per dataset row: the reference class.
        seed: the plan's seed (for the stream positions).
        epoch: the plan's epoch.
        num_random_draws: shuffles to average the random figures over.
    """
    lengths = np.asarray(lengths, np.float64)
    is_expert = np.asarray(is_expert, np.float64)
    n = len(lengths)
    sizes = np.diff(plan.step_offsets)
    measured = max(plan.num_steps - 1, 1)
    steps = _step_of_conversations(plan)
    ours = _composition(
        steps, sizes, is_expert[plan.conversation_indices], lengths[plan.conversation_indices], measured
    )
    rng = np.random.default_rng(12345)
    draws = []
    for _ in range(num_random_draws):
        shuffled = rng.permutation(plan.conversation_indices)  # the planned ones (a peer's plan may drop some)
        draws.append(_composition(steps, sizes, is_expert[shuffled], lengths[shuffled], measured))
    random_figures = np.mean(draws, axis=0)
    position = np.empty(n, np.int64)
    position[stream_order(n, seed, epoch)] = np.arange(n)
    natural_step = np.searchsorted(np.cumsum(sizes), position[plan.conversation_indices], "right")
    displacement = np.abs(steps - natural_step)
    return MixingComparison(
        *ours,
        *(float(x) for x in random_figures),
        max_displacement_steps=int(displacement.max(initial=0)),
        mean_displacement_steps=float(displacement.mean()) if n else 0.0,
        num_random_draws=num_random_draws,
    )
