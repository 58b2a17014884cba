"""bench.nasa_digits: the negated digit's rate and the other digits' accuracy are read from the right samples, and the
negative prompt and NASA scale reach `generate`."""
from __future__ import annotations

import torch

from bench.nasa_digits import judge
from train.evaluation.digits_text import DIGIT_WORDS


class RealDigits:
    """A stand-in text module whose samples are real digits: the prompted digit, except prompts of `swap` give
    digit `into` (as a perfectly negated model would)."""

    def __init__(self, swap: int, into: int):
        from train.evaluation.labelled import labelled_data

        self.images, self.labels = labelled_data(None).split_tensors("validation")
        self.swap, self.into, self.asked = swap, into, {}

    def generate(self, prompts, seed=0, **kwargs):
        self.asked = kwargs
        digits = [DIGIT_WORDS.index(p.split()[-1]) for p in prompts]
        digits = [self.into if d == self.swap else d for d in digits]
        count = {d: 0 for d in range(10)}
        out = []
        for d in digits:
            out.append(self.images[self.labels == d][count[d]])
            count[d] += 1
        return torch.stack(out).expand(-1, 3, -1, -1), 1.0

    def samples_to_images(self, samples):
        return samples


def test_judge_reads_the_negated_and_the_other_digits(classifier):
    from train.evaluation.evaluate import classify

    module = RealDigits(swap=7, into=1)
    row = judge(module, negated=7, num_per_class=5, seed=0, negative="a handwritten seven", nasa_scale=2.0)
    assert module.asked == {"negative": "a handwritten seven", "nasa_scale": 2.0} and row["nfe"] == 1.0
    ones = module.images[module.labels == 1][:10]
    predicted_as_seven = (classify(classifier, ones)[1].argmax(1) == 7)[5:].float().mean().item()
    assert row["negated_rate"] == predicted_as_seven  # the 7-prompts got ones: judged as 7 only if misread
    honest = judge(RealDigits(swap=-1, into=-1), negated=7, num_per_class=5, seed=0)
    assert honest["negated_rate"] >= 0.8 and honest["other_accuracy"] >= 0.8  # real digits are recognised
