"""blockd-img: qemu-img's offline image commands on blockd's drivers."""
