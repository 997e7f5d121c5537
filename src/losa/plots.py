"""PNG plots of a LoSA run: per-block sparsity by step (paper figure 3), ranks by step, loss."""

from __future__ import annotations

from pathlib import Path


def plot_run(records: list[dict], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    directory.mkdir(parents=True, exist_ok=True)
    written = []

    def per_block(key: str, ylabel: str, filename: str, title: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for rec in records:
            values = rec[key]
            if values:
                ax.plot(range(len(values)), values, marker="o", ms=3, label=f"step {rec['step']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / filename, dpi=120)
        plt.close(fig)
        written.append(filename)

    per_block("block_sparsity", "sparsity", "sparsity_by_step.png", "Per-block sparsity by step")
    per_block("ranks", "adapter rank", "ranks_by_step.png", "Per-block adapter rank by step")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for rec in records:
        losses = rec["training"].get("loss", [])
        ax.plot(range(offset, offset + len(losses)), losses, label=f"step {rec['step']}")
        offset += len(losses)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / "training_loss.png", dpi=120)
    plt.close(fig)
    written.append("training_loss.png")
    return written
