"""A domain's images:

    loaders.py  DIR/train and DIR/val as ImageFolder trees, read into seeded, reproducible loaders
    digits.py   the offline digits domains (mnist, digits, mnist_m) written as such trees

Loaded where used: `import da2ext` does not import them.
"""
