"""vEM stores: read the CellMap / OpenOrganelle layout, write our own, phantoms, stack import, 2D patches."""
