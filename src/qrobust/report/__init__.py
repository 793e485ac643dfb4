"""Study reports: matplotlib figures, one self-contained HTML file and a markdown summary."""

from qrobust.report.fit import FORMULA, Fit, accuracy_model, fit_accuracy
from qrobust.report.render import build_report, write_report

__all__ = ["FORMULA", "Fit", "accuracy_model", "build_report", "fit_accuracy", "write_report"]
