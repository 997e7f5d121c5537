"""PeakMemory measures the phase inside it only (the process's earlier peak does not count)."""

import pytest
import torch

from losa.report import PeakMemory, Timer


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_peak_counts_this_phase_only():
    big = torch.ones(512 * 2**20 // 4)  # 512 MiB, touched: resident, then returned to the OS
    del big
    earlier_peak = _vm_hwm_mib()  # at least the resident baseline + 512 MiB
    with PeakMemory("cpu") as peak:
        small = torch.ones(64 * 2**20 // 4)  # 64 MiB
    assert peak.mib is not None
    assert 64 <= peak.mib < earlier_peak - 256  # the 512 MiB before the phase is not in its peak
    del small


def test_timer_total_sums_finished_phases():
    timer = Timer()
    timer.seconds.update(prune=1.5, sra=0.25, lsr=9.0)
    assert timer.total("prune", "sra") == 1.75 and timer.total("missing") == 0.0
