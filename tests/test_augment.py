import pytest
import torch

from kd.augment import Augmenter, Normalize
from kd.config import AugmentConfig

N = 40


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, 3, 24, 24), generator=g, dtype=torch.uint8)


def test_a_sample_gets_the_same_view_whatever_batch_it_lands_in(images):
    aug = Augmenter(AugmentConfig(seed=3), N)
    idx_a = torch.tensor([5, 17, 2, 30])
    idx_b = torch.tensor([30, 9, 5, 11, 2, 17, 39])
    va, vb = aug(images[idx_a], idx_a, epoch=4), aug(images[idx_b], idx_b, epoch=4)
    for i, sample in enumerate(idx_a.tolist()):
        j = idx_b.tolist().index(sample)
        assert torch.allclose(va[i], vb[j], atol=1e-6)
    fresh = Augmenter(AugmentConfig(seed=3), N)  # another process / another trial: the same stream
    assert torch.allclose(fresh(images[idx_a], idx_a, epoch=4), va, atol=1e-6)


def test_views_change_with_epoch_and_seed(images):
    idx = torch.arange(N)
    aug = Augmenter(AugmentConfig(seed=0), N)
    e0, e1 = aug(images, idx, 0), aug(images, idx, 1)
    other = Augmenter(AugmentConfig(seed=1), N)(images, idx, 0)
    assert not torch.allclose(e0, e1) and not torch.allclose(e0, other)
    assert e0.min() >= 0 and e0.max() <= 1 and e0.shape == (N, 3, 24, 24)


def test_no_augmentation_is_the_identity(images):
    plain = AugmentConfig(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], flip=0.0, rotation=0.0,
                          brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    idx = torch.arange(N)
    out = Augmenter(plain, N)(images, idx, 0)
    assert torch.allclose(out, images.float() / 255, atol=1e-5)


def test_flip_only_mirrors(images):
    flip = AugmentConfig(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], flip=1.0, rotation=0.0,
                         brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    idx = torch.arange(N)
    out = Augmenter(flip, N)(images, idx, 0)
    assert torch.allclose(out, images.float().flip(-1) / 255, atol=1e-5)


def test_normalize_uses_the_models_mean_and_std():
    x = torch.full((1, 3, 2, 2), 0.5)
    out = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))(x)
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.0, 1.0, 0.5])
