"""Logistic regression, written like SambaNova's logistic-regression tutorial.

python examples/logreg_app.py compile -b 32 --pef-name logreg
python examples/logreg_app.py run -b 32 -p out/logreg/logreg.pef
python examples/logreg_app.py test -b 32 -p out/logreg/logreg.pef
"""

import sys

import torch
import torch.nn as nn

import sambaflow.samba.utils as utils
from sambaflow import samba
from sambaflow.app import datasets
from sambaflow.samba.utils.argparser import parse_app_args, positive_int
from sambaflow.samba.utils.common import common_app_driver


class LogReg(nn.Module):
    """A single linear layer and cross-entropy loss."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.lin_layer = nn.Linear(in_features=num_features, out_features=num_classes)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        out = self.lin_layer(inputs)
        loss = self.criterion(out, targets)
        return loss, out


def add_args(parser) -> None:
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default: 0, none)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default: 1e-4)")
    parser.add_argument(
        "--num-features",
        type=positive_int,
        default=784,
        help="input features per sample (default: 784, 28x28)",
    )
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


def train(args, model: nn.Module) -> None:
    x_train, y_train, x_test, y_test = datasets.load(args.data_dir)
    x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    total_steps = len(x_train) // args.batch_size
    losses = []
    for epoch in range(args.num_epochs):
        generator = torch.Generator().manual_seed(1000 * args.seed + epoch)
        for i, (images, labels) in enumerate(
            datasets.batches(x_train, y_train, args.batch_size, True, generator)
        ):
            loss, _ = samba.session.run(
                input_tensors=[
                    samba.from_torch_tensor(images, name="image", batch_dim=0),
                    samba.from_torch_tensor(labels, name="label", batch_dim=0),
                ],
                output_tensors=model.output_tensors,
                hyperparam_dict={"lr": args.lr, "weight_decay": args.weight_decay},
            )
            losses.append(float(loss))
            if (i + 1) % 10 == 0:
                print(
                    f"Epoch [{epoch + 1}/{args.num_epochs}], Step [{i + 1}/{total_steps}], Loss: {losses[-1]:.4f}"
                )
    samba.session.to_cpu(model)
    with torch.no_grad():
        loss, outputs = model(x_test, y_test)
    accuracy = 100.0 * float((outputs.argmax(dim=1) == y_test).float().mean())
    print(f"Test Accuracy: {accuracy:.2f}  Loss: {float(loss):.4f}")
    if args.log_losses:
        samba.save_json(losses, args.log_losses)


def evaluate_on_device(args, model: nn.Module) -> None:
    _, _, x_test, y_test = datasets.load(args.data_dir)
    correct = seen = 0
    for images, labels in datasets.batches(x_test.reshape(len(x_test), -1), y_test, args.batch_size, False):
        inputs = [
            samba.from_torch_tensor(images, name="image", batch_dim=0),
            samba.from_torch_tensor(labels, name="label", batch_dim=0),
        ]
        _, outputs = samba.session.run(inputs, model.output_tensors, section_types=["fwd"])
        correct += int((outputs.argmax(dim=1) == labels).sum())
        seen += len(labels)
    print(f"Inference accuracy on {seen} test samples: {100.0 * correct / seen:.2f}")


def main(argv) -> None:
    args = parse_app_args(argv=argv, common_parser_fn=add_args, run_parser_fn=add_run_args)
    utils.set_seed(args.seed)
    model = LogReg(args.num_features, args.num_classes)
    samba.from_torch_model_(model)
    inputs = (
        samba.randn(args.batch_size, args.num_features, name="image", batch_dim=0),
        samba.randint(args.num_classes, (args.batch_size,), name="label", batch_dim=0),
    )
    optimizer = (
        None
        if args.inference
        else samba.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    )
    if args.command == "run":
        samba.check_output_path(args.log_losses, "--log-losses")  # now, not after training
        utils.trace_graph(model, inputs, optimizer, pef=args.pef, init_output_grads=not args.inference)
        evaluate_on_device(args, model) if args.inference else train(args, model)
    else:
        common_app_driver(
            args,
            model,
            inputs,
            optimizer,
            name="logreg",
            init_output_grads=not args.inference,
            app_dir=utils.get_file_dir(__file__),
        )


if __name__ == "__main__":
    main(sys.argv[1:])
