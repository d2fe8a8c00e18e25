"""The seed document's sample app: ResFFNLogReg trained through a compiled PEF.

    python examples/ffn_app.py compile -b 64 --pef-name ffn             # writes out/ffn/ffn.pef
    python examples/ffn_app.py run -b 64 -p out/ffn/ffn.pef              # trains from the PEF
    python examples/ffn_app.py compile -b 256 -mb 64 --pef-name ffn_mb  # 4 micro-batches per step
    python examples/ffn_app.py test -b 64 -p out/ffn/ffn.pef
    python examples/ffn_app.py measure-performance -b 64 -p out/ffn/ffn.pef -n 100

Data parallel (one PEF, any number of replicas; each takes its own shard and -b 64 of it a step):

    python examples/ffn_app.py compile -b 64 --data-parallel -ws 2 --pef-name ffn_dp
    torchrun --standalone --nproc_per_node 2 examples/ffn_app.py run -b 64 --data-parallel --reduce-on-rdu -p out/ffn_dp/ffn_dp.pef

With no --data-dir it trains on scikit-learn's digits (resized to 28x28); with --data-dir, on MNIST.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data.distributed import DistributedSampler

import sambaflow
import sambaflow.samba.utils as utils
from sambaflow import samba
from sambaflow.app import datasets
from sambaflow.samba.utils.argparser import parse_app_args, positive_int
from sambaflow.samba.utils.common import common_app_driver


def basic_weight_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        nn.init.zeros_(module.bias)


class ResFFNLogReg(nn.Module):
    """Feed Forward Network with two different activation functions and a residual connection"""

    def __init__(self, num_features: int, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.gemm1 = nn.Linear(num_features, hidden_size, bias=True)
        self.gemm2 = nn.Linear(hidden_size, hidden_size, bias=True)
        self.gemm3 = nn.Linear(hidden_size, num_classes, bias=True)

        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)

        self.tanh1 = nn.Tanh()
        self.sigmoid1 = nn.Sigmoid()

        self.criterion = nn.CrossEntropyLoss()

        self.apply(basic_weight_init)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor]:
        out = self.gemm1(inputs)
        out = self.norm1(out)
        out = self.tanh1(out)
        residual = out
        out = self.gemm2(out)
        out = self.norm2(out)
        out = out + residual
        out = self.sigmoid1(out)
        out = self.gemm3(out)
        loss = self.criterion(out, targets)
        return loss, out


def add_args(parser) -> None:
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: 0.1)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default: 1e-4)")
    parser.add_argument(
        "--num-features",
        type=positive_int,
        default=784,
        help="input features per sample (default: 784, 28x28)",
    )
    parser.add_argument(
        "--hidden-size", type=positive_int, default=256, help="width of the hidden layers (default: 256)"
    )
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        default=10,
        help="output classes; labels must be 0..N-1 (default: 10)",
    )


def add_run_args(parser) -> None:
    parser.add_argument("-e", "--num-epochs", type=int, default=5, help="training epochs (default: 5)")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files; default: scikit-learn digits")
    parser.add_argument("--log-losses", default=None, help="write every step's loss to this JSON file")
    parser.add_argument("--save-checkpoint", default=None, help="save model and optimizer after training")
    parser.add_argument(
        "--load-checkpoint",
        default=None,
        help="load model and optimizer from this checkpoint first (resume training, or --inference with trained weights)",
    )


def is_rank_0() -> bool:
    """Data-parallel replicas print and write files from rank 0 only."""
    return not dist.is_initialized() or dist.get_rank() == 0


def epoch_batches(args, x: torch.Tensor, y: torch.Tensor, epoch: int):
    """This replica's batches for one epoch: with data parallel, a DistributedSampler shard (the
    same shuffle on every rank, a different part each), else the whole set shuffled."""
    if not dist.is_initialized():
        generator = torch.Generator().manual_seed(1000 * args.seed + epoch)
        return datasets.batches(x, y, args.batch_size, True, generator)
    sampler = DistributedSampler(range(len(x)), shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    index = torch.tensor(list(sampler))
    return datasets.batches(x[index], y[index], args.batch_size, False)


def train(args, model: nn.Module, optim, first_epoch: int = 0) -> None:
    x_train, y_train, x_test, y_test = datasets.load(args.data_dir)
    x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    hyperparam_dict = {"lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay}
    replicas = dist.get_world_size() if dist.is_initialized() else 1
    total_steps = len(x_train) // replicas // args.batch_size
    losses: list[float] = []
    for epoch in range(first_epoch, args.num_epochs):
        for i, (images, labels) in enumerate(epoch_batches(args, x_train, y_train, epoch)):
            sn_images = samba.from_torch_tensor(images, name="image", batch_dim=0)
            sn_labels = samba.from_torch_tensor(labels, name="label", batch_dim=0)
            loss, outputs = samba.session.run(
                input_tensors=[sn_images, sn_labels],
                output_tensors=model.output_tensors,
                hyperparam_dict=hyperparam_dict,
                data_parallel=args.data_parallel,
                reduce_on_rdu=args.reduce_on_rdu,
            )
            losses.append(float(loss))
        if is_rank_0():
            print(
                f"Epoch [{epoch + 1}/{args.num_epochs}], Step [{i + 1}/{total_steps}], Loss: {losses[-1]:.4f}"
            )
    samba.session.to_cpu(model, optim)
    if not is_rank_0():
        return
    evaluate(model, x_test, y_test)
    if args.save_checkpoint:  # atomic: a kill or a full disk leaves the previous one whole
        checkpoint = {"model": model.state_dict(), "optimizer": optim.state_dict()}
        samba.save(checkpoint | {"completed_epochs": args.num_epochs}, args.save_checkpoint)
    if args.log_losses:
        samba.save_json(losses, args.log_losses)


def evaluate(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> None:
    samba.session.tracing = False
    with torch.no_grad():
        loss, outputs = model(x_test, y_test)  # the host model, in plain PyTorch
    accuracy = 100.0 * float((outputs.argmax(dim=1) == y_test).float().mean())
    print(f"Test Accuracy: {accuracy:.2f}  Loss: {float(loss):.4f}")


def infer(args, model: nn.Module) -> None:
    _, _, x_test, y_test = datasets.load(args.data_dir)
    x_test = x_test.reshape(len(x_test), -1)
    correct = seen = 0
    for images, labels in datasets.batches(x_test, y_test, args.batch_size, False):
        inputs = [
            samba.from_torch_tensor(images, name="image", batch_dim=0),
            samba.from_torch_tensor(labels, name="label", batch_dim=0),
        ]
        loss, outputs = samba.session.run(inputs, model.output_tensors, section_types=["fwd"])
        correct += int((outputs.argmax(dim=1) == labels).sum())
        seen += len(labels)
    if is_rank_0():
        print(f"Inference accuracy on {seen} test samples: {100.0 * correct / seen:.2f}")


def main(argv: list[str]) -> None:
    args = parse_app_args(argv=argv, common_parser_fn=add_args, run_parser_fn=add_run_args)

    # Input definition
    image = samba.randn(args.batch_size, args.num_features, name="image", batch_dim=0)
    label = samba.randint(args.num_classes, (args.batch_size,), name="label", batch_dim=0)
    inputs = (image, label)

    # Model definition
    utils.set_seed(args.seed)
    model = ResFFNLogReg(args.num_features, args.hidden_size, args.num_classes)
    samba.from_torch_model_(model)

    # Optimizer definition
    optim = sambaflow.samba.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )

    if args.command == "run":
        # refuse now, not after training, a path the results could not be written to
        samba.check_output_path(args.save_checkpoint, "--save-checkpoint")
        samba.check_output_path(args.log_losses, "--log-losses")
        first_epoch = 0
        if args.load_checkpoint:  # load into the host model before tracing moves it to the device
            checkpoint = samba.load(args.load_checkpoint, model, optim)
            first_epoch = int(checkpoint.get("completed_epochs", 0))
        # Trace the graph
        utils.trace_graph(model, inputs, optim, pef=args.pef, mapping=args.mapping)
        # Within the user defined train function, call: samba.session.run
        infer(args, model) if args.inference else train(args, model, optim, first_epoch)
    else:
        common_app_driver(
            args=args,
            model=model,
            inputs=inputs,
            optim=optim,
            name=model.__class__.__name__,
            init_output_grads=not args.inference,
            app_dir=utils.get_file_dir(__file__),
        )


if __name__ == "__main__":
    main(sys.argv[1:])
