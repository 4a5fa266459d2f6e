"""FaultBanner: says which device was lost mid-answer and offers to re-plan and continue, or wait."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from app.messages import StageLostReport


class FaultBanner(QWidget):
    # --- Signals
    sig_replan_requested = Signal()
    """Re-plan the layout onto the remaining devices and continue the answer."""
    sig_retry_requested = Signal()
    """The lost device is back (or was restarted): load the same layout and continue."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("faultBanner")
        self.text = QLabel("")
        self.text.setWordWrap(True)
        self.replan_button = QPushButton("Re-plan and continue")
        self.replan_button.setObjectName("primary")
        self.retry_button = QPushButton("Retry same layout")
        self.dismiss_button = QPushButton("Dismiss")
        self.dismiss_button.setObjectName("flat")
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.dismiss_button)
        buttons.addWidget(self.retry_button)
        buttons.addWidget(self.replan_button)
        box = QVBoxLayout(self)
        box.setContentsMargins(12, 8, 12, 8)
        box.addWidget(self.text)
        box.addLayout(buttons)
        self.replan_button.clicked.connect(self.sig_replan_requested)
        self.retry_button.clicked.connect(self.sig_retry_requested)
        self.dismiss_button.clicked.connect(self.hide)
        self.report: StageLostReport | None = None
        self.hide()

    def show_report(self, report: StageLostReport, device_name: str, replan_text: str) -> None:
        self.report = report
        where = f"Stage {report.stage_index + 1} on {device_name}" if report.stage_index is not None else "A stage"
        kept = (f" The conversation and the {len(report.partial_ids)} tokens of the answer so far are kept."
                if report.partial_ids else " The conversation is kept.")
        reason = report.reason.rstrip(".")
        self.text.setText(f"<b>{where} was lost.</b> {reason}.{kept} {replan_text}")
        self.show()
