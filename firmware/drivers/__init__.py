# Chip drivers. stpm3x: STPM32/33/34 metering front ends (docs/driver.md).
