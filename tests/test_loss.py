import math

import torch

from cnclip.loss import clip_loss, false_negative_mask


def hand_loss(img, txt, scale, mask=None):
    """Symmetric InfoNCE written out element by element; masked entries leave both softmaxes."""
    n = len(img)
    mask = mask or [[False] * n for _ in range(n)]
    norm = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]
    img, txt = [norm(v) for v in img], [norm(v) for v in txt]
    logits = [[scale * sum(a * b for a, b in zip(img[i], txt[j])) for j in range(n)] for i in range(n)]

    def cross_entropy(rows, masked):
        total = 0.0
        for i, row in enumerate(rows):
            total += -row[i] + math.log(sum(math.exp(row[j]) for j in range(n) if not masked[i][j]))
        return total / n

    transpose = lambda m: [[m[i][j] for i in range(n)] for j in range(n)]
    return (cross_entropy(logits, mask) + cross_entropy(transpose(logits), transpose(mask))) / 2


def test_matches_hand_computation():
    torch.manual_seed(0)
    img, txt = torch.randn(5, 4), torch.randn(5, 4)
    scale = torch.tensor(math.log(20.0))
    got = clip_loss(img, txt, scale).item()
    assert abs(got - hand_loss(img.tolist(), txt.tolist(), 20.0)) < 1e-5


def test_false_negatives_are_masked_not_pushed_apart():
    torch.manual_seed(1)
    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    image_keys = torch.tensor([7, 7, 8, 9])  # entries 0 and 1 share an image
    text_keys = torch.tensor([1, 2, 3, 3])  # entries 2 and 3 have the same caption
    mask = false_negative_mask((image_keys, text_keys), (image_keys, text_keys), torch.arange(4))
    expected = [[False, True, False, False], [True, False, False, False],
                [False, False, False, True], [False, False, True, False]]
    assert mask.tolist() == expected
    got = clip_loss(img, txt, torch.tensor(0.0), image_keys, text_keys).item()
    assert abs(got - hand_loss(img.tolist(), txt.tolist(), 1.0, expected)) < 1e-5
    # Without masking the loss differs: the masked pairs would be counted as negatives.
    assert abs(clip_loss(img, txt, torch.tensor(0.0)).item() - got) > 1e-3


def test_shared_image_gets_no_gradient_towards_separation():
    # Two captions of the same image: with masking, the loss is minimised by both matching it.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    keys = torch.tensor([5, 5])
    loss = clip_loss(img, txt, torch.tensor(math.log(10.0)), keys, torch.tensor([0, 1]))
    loss.backward()
    assert loss.item() < 1e-6
    assert txt.grad.abs().max().item() < 1e-6


def test_loss_is_float32_under_bf16_inputs():
    img, txt = torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16()
    assert clip_loss(img, txt, torch.tensor(1.0)).dtype == torch.float32
