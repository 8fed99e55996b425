"""ViT-S/4 on CIFAR-100 at 90% sparsity: the CIFAR-10 recipe (cifar10_vit_s) with 100 classes."""

from configs import cifar10_vit_s


def get_config():
  c = cifar10_vit_s.get_config()
  c.data.name = "cifar100"
  return c
