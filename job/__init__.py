"""finetune-job: Horovod-distributed fine-tuning of pretrained ResNets with MXNet Gluon."""

__version__ = "0.1.0"
