"""LeNet, written like SambaNova's LeNet tutorial (28x28 images, two conv layers, three linear).

python examples/lenet_app.py compile -b 32 --pef-name lenet
python examples/lenet_app.py run -b 32 -p out/lenet/lenet.pef
python examples/lenet_app.py run -b 32 -p out/lenet/lenet.pef --inference   # training PEF, fwd only

Data parallel, two replicas of one PEF under mpirun (torchrun works the same way):
mpirun -np 2 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 python examples/lenet_app.py run -b 32 --data-parallel --reduce-on-rdu -p out/lenet/lenet.pef
"""

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data.distributed import DistributedSampler

import sambaflow.samba.utils as utils
from sambaflow import samba
from sambaflow.app import datasets
from sambaflow.samba.utils.argparser import parse_app_args, positive_int
from sambaflow.samba.utils.common import common_app_driver


class LeNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=1, out_channels=6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(kernel_size=2)
        self.conv2 = nn.Conv2d(in_channels=6, out_channels=16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(kernel_size=2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        x = self.maxpool1(self.relu1(self.conv1(x)))
        x = self.maxpool2(self.relu2(self.conv2(x)))
        x = x.view(x.shape[0], -1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        out = self.fc3(x)
        loss = self.criterion(out, labels)
        return loss, out


def add_args(parser) -> None:
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default: 1e-4)")
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        default=10,
        help="output classes; labels must be 0..N-1 (default: 10)",
    )


def add_run_args(parser) -> None:
    parser.add_argument("-e", "--num-epochs", type=int, default=3, help="training epochs (default: 3)")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files; default: scikit-learn digits")
    parser.add_argument("--log-losses", default=None, help="write every step's loss to this JSON file")


def is_rank_0() -> bool:
    """Data-parallel replicas print and write files from rank 0 only."""
    return not dist.is_initialized() or dist.get_rank() == 0


def epoch_batches(args, x: torch.Tensor, y: torch.Tensor, epoch: int):
    """This replica's batches: with data parallel a DistributedSampler shard, else all, shuffled."""
    if not dist.is_initialized():
        generator = torch.Generator().manual_seed(1000 * args.seed + epoch)
        return datasets.batches(x, y, args.batch_size, True, generator)
    sampler = DistributedSampler(range(len(x)), shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    index = torch.tensor(list(sampler))
    return datasets.batches(x[index], y[index], args.batch_size, False)


def train(args, model: nn.Module) -> None:
    x_train, y_train, x_test, y_test = datasets.load(args.data_dir)
    hyperparam_dict = {"lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay}
    replicas = dist.get_world_size() if dist.is_initialized() else 1
    total_steps = len(x_train) // replicas // args.batch_size
    losses = []
    for epoch in range(args.num_epochs):
        for i, (images, labels) in enumerate(epoch_batches(args, x_train, y_train, epoch)):
            inputs = [
                samba.from_torch_tensor(images, name="image", batch_dim=0),
                samba.from_torch_tensor(labels, name="label", batch_dim=0),
            ]
            loss, _ = samba.session.run(
                inputs,
                model.output_tensors,
                hyperparam_dict=hyperparam_dict,
                data_parallel=args.data_parallel,
                reduce_on_rdu=args.reduce_on_rdu,
            )
            losses.append(float(loss))
        if is_rank_0():
            print(
                f"Epoch [{epoch + 1}/{args.num_epochs}], Step [{i + 1}/{total_steps}], Loss: {losses[-1]:.4f}"
            )
    samba.session.to_cpu(model)
    if not is_rank_0():
        return
    with torch.no_grad():
        loss, outputs = model(x_test, y_test)
    accuracy = 100.0 * float((outputs.argmax(dim=1) == y_test).float().mean())
    print(f"Test Accuracy: {accuracy:.2f}  Loss: {float(loss):.4f}")
    if args.log_losses:
        samba.save_json(losses, args.log_losses)


def test_inference(args, model: nn.Module) -> None:
    """Run the fwd section only, as the LeNet tutorial does with a training PEF."""
    _, _, x_test, y_test = datasets.load(args.data_dir)
    correct = seen = 0
    for images, labels in datasets.batches(x_test, y_test, args.batch_size, False):
        inputs = [
            samba.from_torch_tensor(images, name="image", batch_dim=0),
            samba.from_torch_tensor(labels, name="label", batch_dim=0),
        ]
        _, outputs = samba.session.run(inputs, model.output_tensors, section_types=["fwd"])
        correct += int((outputs.argmax(dim=1) == labels).sum())
        seen += len(labels)
    if is_rank_0():
        print(f"Inference accuracy on {seen} test samples: {100.0 * correct / seen:.2f}")


def main(argv) -> None:
    args = parse_app_args(argv=argv, common_parser_fn=add_args, run_parser_fn=add_run_args)
    utils.set_seed(args.seed)
    model = LeNet(args.num_classes)
    samba.from_torch_model_(model)
    inputs = (
        samba.randn(args.batch_size, 1, 28, 28, name="image", batch_dim=0),
        samba.randint(args.num_classes, (args.batch_size,), name="label", batch_dim=0),
    )
    optimizer = (
        None
        if args.inference
        else samba.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    )
    if args.command == "run":
        samba.check_output_path(args.log_losses, "--log-losses")  # now, not after training
        utils.trace_graph(model, inputs, optimizer, pef=args.pef, init_output_grads=not args.inference)
        test_inference(args, model) if args.inference else train(args, model)
    else:
        common_app_driver(
            args,
            model,
            inputs,
            optimizer,
            name="lenet",
            init_output_grads=not args.inference,
            app_dir=utils.get_file_dir(__file__),
        )


if __name__ == "__main__":
    main(sys.argv[1:])
