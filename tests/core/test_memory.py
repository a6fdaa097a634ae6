"""effalg.core.memory: RssAnon, peak tracking and its report."""

import logging
import time

import torch

from effalg.core.memory import PeakMemory, reports_peak_memory, rss_anon


def test_peak_memory_sees_a_transient():
    assert rss_anon() > 0
    with PeakMemory(interval=0.001) as mem:
        t = torch.ones(48 << 20, dtype=torch.uint8)  # 48 MiB transient
        time.sleep(0.05)
        del t
    assert mem.peak_mib is not None and mem.peak_mib > 40


def test_reports_peak_memory_logs(caplog):
    log = logging.getLogger("effalg.test_memory")

    @reports_peak_memory(log, "my sweep")
    def sweep(x):
        """doc"""
        return x + 1

    with caplog.at_level(logging.INFO, logger="effalg.test_memory"):
        assert sweep(1) == 2
    assert sweep.__doc__ == "doc" and "my sweep: peak anonymous memory" in caplog.text
