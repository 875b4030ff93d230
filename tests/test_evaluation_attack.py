"""The evaluation attack against a textbook PGD of the same budget, and APGD in ``evaluate``.

The textbook PGD (Madry et al. 2018) is written out here: cross-entropy loss, sign steps of
2.5 eps / steps, a uniform random start in the box, the last iterate of each restart checked.
On small standard-trained networks the margin loss alone (ctbench's earlier evaluation attack)
found fewer counterexamples than it; ``evaluation_pgd`` alternates the two losses over its
restarts and must find at least as many."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctbench.attacks import PGDSettings, evaluation_pgd
from ctbench.bounds import linf_box
from ctbench.data import Split
from ctbench.evaluation import APGDAttack, evaluate

STEPS, RESTARTS = 20, 3


def standard_trained_mlp(mnist, seed: int, width: int, epochs: int) -> nn.Sequential:
    """A small MLP trained without perturbation on 3,000 MNIST images (about a second)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    images, labels = mnist.train.images[:3000].float() / 255, mnist.train.labels[:3000]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for start in range(0, 3000, 100):
            optimizer.zero_grad()
            F.cross_entropy(model(images[start:start + 100]), labels[start:start + 100]).backward()
            optimizer.step()
    return model.eval()


def textbook_pgd_fooled(model, x, y, eps: float, generator: torch.Generator) -> torch.Tensor:
    """Per sample: whether any restart of a textbook PGD ends on a misclassified point."""
    box = linf_box(x, eps)
    fooled = torch.zeros(len(y), dtype=torch.bool)
    for _ in range(RESTARTS):
        point = box.lower + torch.rand(x.shape, generator=generator) * (box.upper - box.lower)
        for _ in range(STEPS):
            point.requires_grad_(True)
            gradient, = torch.autograd.grad(F.cross_entropy(model(point), y), point)
            point = torch.min(torch.max(point.detach() + 2.5 * eps / STEPS * gradient.sign(), box.lower), box.upper)
        with torch.no_grad():
            fooled |= model(point).argmax(1) != y
    return fooled


@pytest.mark.parametrize("seed, width, epochs, eps", [(0, 64, 3, 0.1), (1, 256, 10, 0.05)])
def test_evaluation_pgd_finds_at_least_the_counterexamples_of_a_textbook_pgd(mnist, seed, width, epochs, eps):
    model = standard_trained_mlp(mnist, seed, width, epochs)
    x, y = mnist.test.images[:500].float() / 255, mnist.test.labels[:500]
    textbook = textbook_pgd_fooled(model, x, y, eps, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    point = evaluation_pgd(model, linf_box(x, eps), y, PGDSettings(steps=STEPS, restarts=RESTARTS))
    assert linf_box(x, eps).contains(point).all()
    with torch.no_grad():
        ours = model(point).argmax(1) != y
    assert 0 < int(textbook.sum()) < len(y)  # a comparison where attacks can differ
    assert int(ours.sum()) >= int(textbook.sum())


def test_evaluate_names_its_attack_and_apgd_is_no_weaker_than_a_clean_check(mnist):
    model = standard_trained_mlp(mnist, 0, 64, 2)
    split = Split(mnist.test.images[:100], mnist.test.labels[:100])
    pgd = evaluate(model, split, 0.05, "cpu", attack=PGDSettings(steps=10, restarts=2))
    apgd = evaluate(model, split, 0.05, "cpu", attack=APGDAttack(iterations=10, targets=3))
    none = evaluate(model, split, 0.05, "cpu", attack=None)
    assert pgd.attack == "PGD 10x2 (CE+margin)" and pgd.as_dict()["attack"] == pgd.attack
    assert apgd.attack.startswith("APGD-CE+APGD-T 10 it.") and none.attack is None
    for result in (pgd, apgd):
        assert result.certified_accuracy <= result.adversarial_accuracy < result.natural_accuracy
    with pytest.raises(ValueError, match="iterations, restarts and targets"):
        APGDAttack(iterations=0)
