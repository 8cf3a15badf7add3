"""MeanFlow: time sampling, the JVP-based loss, and one-/few-step samplers."""

from neuromf.meanflow.loss import ChannelLp, MeanFlowLoss, adaptive_weight, interpolate, meanflow_target
from neuromf.meanflow.samplers import SamplingStopped, sample, sample_euler, sample_meanflow
from neuromf.meanflow.time_sampler import TimeSampler

__all__ = ["ChannelLp", "MeanFlowLoss", "SamplingStopped", "TimeSampler", "adaptive_weight", "interpolate",
           "meanflow_target", "sample", "sample_euler", "sample_meanflow"]
