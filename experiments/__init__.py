"""Experiment runners: one resumable command per study, each writing a report page under results/."""
