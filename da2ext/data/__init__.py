"""A domain's images:

    loaders.py  DIR/train and DIR/val as ImageFolder trees, read into seeded, reproducible loaders
    digits.py   the offline digits domains (mnist, digits, mnist_m) written as such trees
"""
