# cmake/PydronDeps.cmake — finds what the C core is built against: Python's headers, libffi
# (through pkg-config), xxHash and LLVM. When something is missing, the build stops with ONE
# message naming each missing piece and the package that provides it on Debian/Ubuntu, Fedora
# and conda-forge, instead of CMake's raw find_package/find_path errors.
#
# Sets: Python_* (FindPython), PkgConfig::FFI and FFI_VERSION, XXHASH_INCLUDE_DIR, LLVM_*
# (LLVMConfig.cmake) and LLVM_SHARED_LIB.

set(PYDRON_MISSING "")

# One entry of the message: what is missing, then the package on each distribution.
macro(pydron_missing what debian fedora conda)
  string(APPEND PYDRON_MISSING
    "\n  - ${what}\n"
    "      Debian/Ubuntu:  sudo apt-get install ${debian}\n"
    "      Fedora:         sudo dnf install ${fedora}\n"
    "      conda-forge:    conda install -c conda-forge ${conda}")
endmacro()

find_package(Python 3.11 COMPONENTS Interpreter Development.Module QUIET)
if(NOT Python_FOUND)
  pydron_missing("Python >= 3.11 with its development headers (Python.h)"
                 "python3-dev" "python3-devel" "python")
endif()

find_package(PkgConfig QUIET)
if(NOT PKG_CONFIG_FOUND)
  pydron_missing("pkg-config (pydron finds libffi through it)"
                 "pkg-config" "pkgconf-pkg-config" "pkg-config")
else()
  pkg_check_modules(FFI QUIET IMPORTED_TARGET libffi)
  if(NOT FFI_FOUND)
    pydron_missing("libffi development files (ffi.h and libffi.pc, for pkg-config)"
                   "libffi-dev" "libffi-devel" "libffi")
  endif()
endif()

find_path(XXHASH_INCLUDE_DIR xxhash.h)
if(NOT XXHASH_INCLUDE_DIR)
  pydron_missing("xxHash header (xxhash.h)" "libxxhash-dev" "xxhash-devel" "xxhash")
endif()

# Debian installs LLVM's CMake files under /usr/lib/llvm-N; elsewhere the default search finds them.
find_package(LLVM CONFIG QUIET HINTS /usr/lib/llvm-18/cmake /usr/lib/llvm-16/cmake
             /usr/lib/llvm-15/cmake /usr/lib/llvm-14/cmake)
if(NOT LLVM_FOUND)
  pydron_missing("LLVM development files, version 14 or newer (LLVMConfig.cmake; set LLVM_DIR \
to its folder if LLVM is installed somewhere unusual)" "llvm-dev" "llvm-devel" "llvmdev")
else()
  find_library(LLVM_SHARED_LIB NAMES LLVM LLVM-${LLVM_VERSION_MAJOR} HINTS ${LLVM_LIBRARY_DIRS})
  if(NOT LLVM_SHARED_LIB)
    pydron_missing("the shared LLVM library (libLLVM-${LLVM_VERSION_MAJOR}.so) of LLVM \
${LLVM_PACKAGE_VERSION} in ${LLVM_LIBRARY_DIRS}" "llvm-dev" "llvm-devel" "llvmdev")
  endif()
endif()

if(PYDRON_MISSING)
  message(FATAL_ERROR "pydron cannot be built: missing build dependencies.${PYDRON_MISSING}\n"
    "Install them, then run `pip install .` (or `make setup`) again.")
endif()
message(STATUS "pydron: LLVM ${LLVM_PACKAGE_VERSION} from ${LLVM_DIR}")
