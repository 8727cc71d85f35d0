# Included into llama-cpp-python's own CMake project by scripts/build-llama-cpp.sh, which configures it
# with LLAMA_BUILD=OFF (it compiles nothing): the wheel carries the llama.cpp that script built once
# instead, its shared libraries and llama.cpp's two servers, all in llama_cpp/lib, where llama_cpp
# loads the libraries and each file finds the ones it links beside itself ($ORIGIN).
file(GLOB libraries "${VLMKIT_LLAMA_CPP_BIN}/lib*${CMAKE_SHARED_LIBRARY_SUFFIX}*")
if(NOT libraries)
  message(FATAL_ERROR "no llama.cpp shared libraries in VLMKIT_LLAMA_CPP_BIN='${VLMKIT_LLAMA_CPP_BIN}'")
endif()
install(FILES ${libraries} DESTINATION "${SKBUILD_PLATLIB_DIR}/llama_cpp/lib")
install(PROGRAMS "${VLMKIT_LLAMA_CPP_BIN}/llama-server" "${VLMKIT_LLAMA_CPP_BIN}/ggml-rpc-server"
        DESTINATION "${SKBUILD_PLATLIB_DIR}/llama_cpp/lib")
