"""GRPO pieces as pure functions on one rank's data: rewards, group advantages, the PPO-clip loss, the sample buffer."""
