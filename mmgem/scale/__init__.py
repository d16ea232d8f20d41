"""Past one process: batch embedding on Ray Data (`mmgem embed`) and the LanceDB search backend."""
