"""Models: the class-agnostic Mask R-CNN proposal generator (:mod:`maskflow.models.maskrcnn`, its config in
:mod:`maskflow.models.maskrcnn_config`). Import the submodules; this package imports nothing, so a config module
stays free of torch."""
